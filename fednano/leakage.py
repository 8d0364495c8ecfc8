"""What an honest-but-curious server learns from what the split channel brings it, measured.

In split learning the server receives, at every training step, each client's adapted input embeddings
(text tokens through NanoAdapter-T, visual tokens through NanoAdapter-I) and the answer tokens as
`labels`, in the clear. The server holds the LLM's input-embedding table and may run the public frozen
vision encoder and connector. Three attacks, on exactly the frames it would receive (encoded and
decoded in the run's `split.wire_dtype`):

    text    each received text embedding's nearest row of the embedding table (L2) is taken as the
            token; the share of text tokens recovered. NanoAdapter-T starts as the identity, so at
            round 0 this is the whole prompt.
    labels  the share of answer tokens the server reads: `labels` travel in the clear, so all of them.
    images  each received image's visual tokens are matched (mean L2 over tokens) against the
            connector's output for every image of a candidate pool holding the true one; top-1
            retrieval rate. The server does not know NanoAdapter-I, so it compares un-adapted outputs.

Measured for the adapters at initialisation (round 0) and the run's final ones, on samples from
every client's training split; the pure functions are tested against hand-built cases.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fednano.backbones.bundle import load_nanoedge, load_server_llm
from fednano.backbones.prepare import ensure_prepared
from fednano.client.features import ImageFeatures, Workload
from fednano.client.nanoedge import NanoEdge
from fednano.config import RunConfig
from fednano.data import load_task, system_prompt
from fednano.data.partition import partitions
from fednano.data.prompts import IGNORE_INDEX, IMAGE_PLACEHOLDER
from fednano.data.samples import Sample
from fednano.devices import DTYPES, dtype_of
from fednano.experiments.results import markdown_table
from fednano.export import ExportError, read_run
from fednano.privacy import TextNoise, metric_epsilon, randomized_answers
from fednano.server.llm import ServerLLM
from fednano.split.frames import SCALED, Frame, decode, encode
from fednano.split.label_private import head_loss, labels_from_gradients, noised_gradient
from fednano.split.parts import PROTOCOLS


# ------------------------------------------------------------------ the attacks (pure)
def nearest_rows(x: torch.Tensor, table: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Index of the nearest row of `table` (V, d) to each row of `x` (N, d), by L2 distance."""
    t = table.float()
    sq = (t * t).sum(1)
    out = [(sq[None, :] - 2 * part.float() @ t.T).argmin(1) for part in x.split(chunk)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=table.device)


def text_recovered(received: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, table: torch.Tensor) -> tuple[int, int]:
    """(text tokens whose nearest table row is the true token, text tokens) among the real, non-image positions."""
    where = mask.bool() & (input_ids != IMAGE_PLACEHOLDER)
    guess = nearest_rows(received[where], table)
    return int((guess == input_ids[where].to(guess.device)).sum()), int(where.sum())


def image_top1(received: torch.Tensor, pool: torch.Tensor, truth: list[int]) -> int:
    """How many received images (M, N, d) are nearest (mean L2 over their N tokens) to their own image
    among the pool's (P, N, d); `truth` gives each one's index in the pool."""
    dist = torch.cdist(received.float().transpose(0, 1), pool.float().transpose(0, 1)).mean(0)  # (M, P)
    return int((dist.argmin(1) == torch.tensor(truth, device=dist.device)).sum())


# ------------------------------------------------------------------ on what the server receives
@dataclass
class Leakage:
    text_tokens_recovered: float
    text_tokens: int
    answer_tokens_in_clear: float
    answer_tokens: int
    image_top1: float
    images: int
    image_pool: int


def as_received(embeds: torch.Tensor, wire: str) -> torch.Tensor:
    """The embeddings as the split server decodes them from a training frame in `wire`."""
    frame = Frame("train", {"embeds": embeds.float() if wire in SCALED else embeds.to(DTYPES[wire])},
                  scaled={"embeds": wire} if wire in SCALED else {})
    return decode(encode(frame)).tensors["embeds"].float()


@torch.no_grad()
def audit(edge: NanoEdge, work: Workload, table: torch.Tensor, samples: list[Sample], pool: list[str], wire: str,
          protocol: str = "activations", truth: list[Sample] | None = None) -> Leakage:
    """The three attacks on the training frames `samples` would produce under `protocol` (split.parts; pool:
    candidate image paths, holding every image of `samples`). The cached protocols send each image's connector
    output (before NanoAdapter-I), and `cached-features+ids` the token ids themselves. `truth`: the samples with
    their true answers, where `samples` carry randomized ones (privacy.label_epsilon): the labels the server reads
    are then right only for the answers randomized response kept."""
    edge.eval()
    batch, feats = work.train_batch(samples)
    received = as_received(edge.embed(batch.input_ids, feats), wire)
    got, n_text = text_recovered(received, batch.input_ids, batch.attention_mask, table)
    sent = PROTOCOLS[protocol]
    if sent.sends_ids:
        got = n_text  # the ids are the text
    if sent.caches_features and feats is not None:
        received = received.masked_scatter((batch.input_ids == IMAGE_PLACEHOLDER).unsqueeze(-1).to(received.device),
                                           as_received(edge.connector(feats), wire).to(received.device))
    per_row = (batch.labels != IGNORE_INDEX).sum(1)
    n_answer = int(per_row.sum())
    kept = [truth is None or t.answer == s.answer for s, t in zip(samples, truth or samples, strict=True)]
    read = int(per_row[torch.tensor(kept, dtype=torch.bool)].sum())
    is_image = batch.input_ids == IMAGE_PLACEHOLDER
    images = [p for s in samples for p in s.images]
    hits = 0
    if images:
        visual = received[is_image].reshape(len(images), edge.num_visual_tokens, -1)
        candidates = torch.cat([edge.connector(work.features(pool[i:i + 64])) for i in range(0, len(pool), 64)])
        hits = image_top1(visual, candidates.to(visual.device), [pool.index(p) for p in images])
    return Leakage(got / max(1, n_text), n_text, read / max(1, n_answer), n_answer, hits / max(1, len(images)), len(images), len(pool))


def audit_run(run_dir: Path, per_client: int = 8, pool_size: int = 200, device: str = "cpu") -> dict[str, Leakage]:
    """The attacks on a run's clients' training frames, with the adapters at initialisation and the final ones."""
    run = read_run(run_dir)
    if run.adapters is None:
        raise ExportError(f"{run_dir}: method {run.cfg.federation.strategy!r} sends nothing through the split channel")
    cfg = run.cfg
    bundle = ensure_prepared(cfg)
    side = load_nanoedge(bundle / "client", cfg.adapter, device)
    table = load_server_llm(bundle, dtype_of(cfg.model.llm_dtype), device).model.get_input_embeddings().weight.detach()
    work = Workload(side.tokenizer, ImageFeatures(side.edge.vision), side.edge.num_visual_tokens, system_prompt(cfg.data.dataset))
    samples = [s for part in partitions(cfg) for s in part.train[:per_client]]
    pool = _image_pool(cfg, samples, pool_size)
    sent, truth = as_sent(cfg, samples)
    with client_noise(side.edge, cfg):
        out = {"round 0 (adapters at init)": audit(side.edge, work, table, sent, pool, cfg.split.wire_dtype, cfg.split.protocol, truth)}
        side.edge.load_adapter_state(run.adapters)
        out[f"final (round {cfg.federation.rounds})"] = audit(side.edge, work, table, sent, pool, cfg.split.wire_dtype,
                                                               cfg.split.protocol, truth)
    return out


def as_sent(cfg: RunConfig, samples: list[Sample]) -> tuple[list[Sample], list[Sample] | None]:
    """(the samples as a client trains on them, the true ones where these differ): privacy.label_epsilon's answers. The audit
    draws its own, seeded, of the same law: the clients' draws are secret and stay on their nodes (as does their noise, which
    client_noise and labels_read likewise redraw)."""
    if not cfg.privacy.label_epsilon:
        return samples, None
    return randomized_answers(samples, load_task(cfg).candidate_sets, cfg.privacy.label_epsilon, cfg.data.seed), samples


class RoundAudit:
    """privacy.audit: the attacks after every round on the same samples and image pool, with `edge` (the server's own
    NanoEdge, into which the caller loads the global adapters: what every client starts its next round from) and the
    LLM's input-embedding table."""

    def __init__(self, cfg: RunConfig, edge: NanoEdge, work: Workload, table: torch.Tensor, llm: ServerLLM | None = None) -> None:
        """`llm`: the server's LLM, for the label-private split's gradient attack (split.label_private)."""
        self.cfg, self.edge, self.work, self.table, self.llm = cfg, edge, work, table, llm
        samples = [s for part in partitions(cfg) for s in part.train[: cfg.privacy.audit_samples]]
        self.pool = _image_pool(cfg, samples, cfg.privacy.audit_pool)
        self.samples, self.truth = as_sent(cfg, samples)

    def __call__(self) -> dict[str, float]:
        with client_noise(self.edge, self.cfg):
            found = audit(self.edge, self.work, self.table, self.samples, self.pool, self.cfg.split.wire_dtype, self.cfg.split.protocol,
                          self.truth)
            if self.cfg.split.label_private and self.llm is not None:  # no labels in the clear: what the gradients give away
                found.answer_tokens_in_clear = self.labels_read()
        return asdict(found)

    @torch.no_grad()
    def labels_read(self) -> float:
        """The share of answer tokens the known-head attack reads, and rightly, from the label-private split's gradients (with
        the clients' privacy.gradient_noise, a fixed seed; under privacy.label_epsilon, only kept answers are right)."""
        batch, feats = self.work.train_batch(self.samples)
        embeds = as_received(self.edge.embed(batch.input_ids, feats), self.cfg.split.wire_dtype)
        targets = batch.labels[:, 1:].to(embeds.device)
        sel = targets != IGNORE_INDEX
        positions = torch.nn.functional.pad(sel, (0, 1), value=False)
        assert self.llm is not None
        hidden = self.llm.hidden_states(embeds, batch.attention_mask, positions).float()
        with torch.enable_grad():
            _, grad = head_loss(hidden, targets[sel], self.edge.embed_tokens.weight.detach(), "mean")
        level = self.cfg.privacy.gradient_noise
        if level:
            grad = noised_gradient(grad, level, torch.Generator(device=grad.device).manual_seed(self.cfg.data.seed))
        read = labels_from_gradients(hidden, grad, self.llm.head.weight.detach(), scale=1 / int(sel.sum()))
        kept = torch.tensor([t.answer == s.answer for s, t in zip(self.samples, self.truth or self.samples, strict=True)],
                            device=targets.device).unsqueeze(1).expand_as(targets)  # privacy.label_epsilon: a read is true if kept
        return float(((read == targets[sel]) & kept[sel]).float().mean())


@contextlib.contextmanager
def client_noise(edge: NanoEdge, cfg: RunConfig) -> Iterator[None]:
    """While inside, `edge` adds the noise a client adds to what it sends (privacy.embedding_noise; a fixed seed)."""
    noise = cfg.privacy.embedding_noise
    edge.text_noise = TextNoise(metric_epsilon(noise, edge.embed_tokens.weight), seed=cfg.data.seed) if noise else None
    try:
        yield
    finally:
        edge.text_noise = None


def plot_leakage(results: dict, path: Path) -> None:
    """leakage.png: the share of text tokens, answer tokens and images the server recovers, per round (privacy.audit)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(0, results.get("zero_shot_leakage"))] + [(r["round"], r.get("leakage")) for r in results["rounds"]]
    points = [(x, v) for x, v in points if v]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    from matplotlib.ticker import MaxNLocator

    for key, style, label in (("text_tokens_recovered", "o-", "text tokens (nearest embedding row)"),
                              ("answer_tokens_in_clear", "s--", "answer tokens (label-private: by the gradient attack)"),
                              ("image_top1", "^-", "images (top-1 retrieval)")):
        ax.plot([x for x, _ in points], [v[key] for _, v in points], style, ms=7 if style == "o-" else 4, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    split = results["config"]["split"]
    ax.set(xlabel="round (0 = adapters at initialisation)", ylabel="share the server recovers", ylim=(-0.02, 1.02),
           title=f"what the server reads · protocol {split['protocol']} · wire {split['wire_dtype']}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _image_pool(cfg: RunConfig, samples: list[Sample], size: int) -> list[str]:
    """The audited samples' images plus distinct others from the clients' data, `size` in all (seeded)."""
    own = list(dict.fromkeys(p for s in samples for p in s.images))
    others = sorted({p for part in partitions(cfg) for s in part.train for p in s.images} - set(own))
    return own + random.Random(cfg.data.seed).sample(others, max(0, min(len(others), size - len(own))))


def write_report(run_dir: Path, results: dict[str, Leakage]) -> str:
    """leakage.json and leakage.md in the run's folder; returns the markdown table."""
    rows = [[name, f"{r.text_tokens_recovered:.3f} of {r.text_tokens}", f"{r.answer_tokens_in_clear:.3f} of {r.answer_tokens}",
             f"{r.image_top1:.3f} of {r.images} (pool {r.image_pool})"] for name, r in results.items()]
    table = markdown_table(["adapters", "text tokens recovered (nearest row)", "answer tokens in the clear",
                            "images retrieved (top-1)"], rows)
    (Path(run_dir) / "leakage.json").write_text(json.dumps({k: asdict(v) for k, v in results.items()}, indent=2))
    (Path(run_dir) / "leakage.md").write_text(table + "\n")
    return table
