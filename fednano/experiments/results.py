"""The results folder: full config, per-round metrics (JSON, rewritten after every
round so no completed round is lost), final adapters, a plot and a Markdown table."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fednano.config import RunConfig, same_config
from fednano.io import atomic_save_tensors, atomic_write_text

BYTES_FIELDS = ("adapters_down", "adapters_up", "fisher_up", "activations_up", "gradients_down", "eval_activations_up", "eval_scores_down",
                "eval_generate_up", "eval_answers_down", "features_up", "features_down", "bundle_down")


@dataclass
class RoundRecord:
    """One round's entry in results.json (docs/quickstart.md, "The results folder", says what each field means)."""

    round: int
    global_accuracy: float | None  # None: the global test set was not scored this round (federation.eval_every)
    global_accuracy_by_category: dict[str, float]
    client_accuracy: dict[str, float]  # partition -> accuracy on its local test split
    client_accuracy_by_category: dict[str, dict[str, float]]
    train_loss: float | None
    client_train_loss: dict[str, float]
    train_examples: int
    aggregated: bool  # a new global state came out of the round
    clients_sampled: int
    clients_accepted: int
    rejected: list[dict]  # node, partition, reason
    dropped: list[dict]  # nodes that did not reply in time
    bytes: dict[str, int]  # BYTES_FIELDS
    split_steps: int
    server_llm_seconds: float  # time the LLM thread was busy
    client_seconds: dict[str, float]
    phase_seconds: dict[str, float]
    seconds: float
    memory: dict  # peak host memory per side; peak GPU memory on CUDA
    validation_accuracy: float | None = None  # data.validation_samples: the validation set, at validation rounds
    leakage: dict[str, float] | None = None  # privacy.audit: what the server reads from the global adapters' frames
    merge_diagnostics: dict | None = None  # federation.merge_diagnostics: what the merge did (fednano.diagnostics)
    dp_epsilon: float | None = None  # privacy.client_dp / dp_sgd: epsilon spent after this round (at privacy.delta; dp_sgd: worst client)
    dp_sgd: dict[str, dict] | None = None  # privacy.dp_sgd: per client that trained, its steps so far, sigma, rate and epsilon
    client_global_accuracy: dict[str, float] | None = None  # clients' own states on the global test set ('local')
    # per message kind (train, evaluate), per client: its time by phase (start, relay, build, data, work)
    client_phase_seconds: dict[str, dict[str, dict[str, float]]] | None = None
    # data.scoring = "generate": the same evaluations scored by the model's own (generated) answers
    global_generated_accuracy: float | None = None
    global_generated_by_category: dict[str, float] | None = None
    client_generated_accuracy: dict[str, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The entry, without the optional fields the run does not have, and the bytes per client."""
        d = {k: v for k, v in asdict(self).items() if v is not None or k in REQUIRED_NONE}
        return d | {"bytes_per_client": bytes_per_client(d)}


def bytes_per_client(record: dict[str, Any]) -> int:
    """Every byte of the round (Flower messages and split channel, both ways), per client that trained."""
    return sum(record["bytes"].values()) // max(1, record["clients_accepted"])


REQUIRED_NONE = ("train_loss", "global_accuracy")  # None when no client trained / the test set was not scored, and still recorded


class RunRecorder:
    """results.json is the commit point: a round's metrics and its checkpoint pointer are
    written together, atomically, after the round's adapters are safely on disk."""

    def __init__(self, out_dir: Path, cfg: RunConfig, resume: bool = False) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        results = self.out / "results.json"
        if resume and results.exists():
            self.data: dict[str, Any] = json.loads(results.read_text())
            if not same_config(self.data.get("config"), cfg):
                raise ValueError(f"{results}: the run was made with a different config; resume with its own config.toml")
            self.data["config"] = cfg.to_dict()  # (with any field added since, at its default)
            return
        atomic_write_text(self.out / "config.toml", cfg.to_toml())
        self.data = {"config": cfg.to_dict(), "rounds": [], "final": {}}

    def set(self, **fields: Any) -> None:
        self.data.update(fields)
        self.save()

    def complete_round(
        self, record: RoundRecord, adapters: dict[str, torch.Tensor], strategy_state: dict[str, torch.Tensor] | None = None,
        best: bool = False,
    ) -> None:
        """Record a finished round and checkpoint the global adapters it produced, with whatever
        the strategy remembers across rounds (server optimiser moments, local clients' adapters).
        `best`: the round has the best validation accuracy so far; its state is kept as well (best-*)."""
        ckpt = self.out / "checkpoint"
        ckpt.mkdir(exist_ok=True)
        entry = record.as_dict()
        rnd = record.round
        files = {"adapters": f"adapters-round-{rnd}.safetensors", "strategy": f"strategy-round-{rnd}.safetensors"}
        if best:
            files |= {"best_adapters": f"best-adapters-round-{rnd}.safetensors", "best_strategy": f"best-strategy-round-{rnd}.safetensors"}
        for what, name in files.items():
            atomic_save_tensors((adapters if what.endswith("adapters") else strategy_state) or {}, ckpt / name)
        self.data["rounds"].append(entry)
        where = {k: f"checkpoint/{v}" for k, v in files.items()}
        self.data["checkpoint"] = {"round": rnd, "adapters": where["adapters"], "strategy": where["strategy"]}
        if best:
            self.data["best_validation"] = {"round": rnd, "validation_accuracy": record.validation_accuracy,
                                            "adapters": where["best_adapters"], "strategy": where["best_strategy"]}
        self.save()
        keep = {Path(p).name for k in ("checkpoint", "best_validation") for p in self.data.get(k, {}).values() if isinstance(p, str)}
        for old in ckpt.glob("*-round-*.safetensors"):
            if old.name not in keep:
                old.unlink()

    def best_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The best validation round's global adapters and strategy state."""
        from safetensors.torch import load_file

        best = self.data["best_validation"]
        return load_file(self.out / best["adapters"]), load_file(self.out / best["strategy"])

    def resume_state(self) -> tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        """(last completed round, its global adapters, the strategy's state), if a checkpoint exists."""
        ck = self.data.get("checkpoint")
        if not ck:
            return None
        from safetensors.torch import load_file

        strategy = load_file(self.out / ck["strategy"]) if ck.get("strategy") else {}
        return int(ck["round"]), load_file(self.out / ck["adapters"]), strategy

    def save(self) -> None:
        atomic_write_text(self.out / "results.json", json.dumps(self.data, indent=2))

    def finish(self, final: dict[str, Any], adapters: dict[str, torch.Tensor]) -> None:
        atomic_save_tensors(adapters, self.out / "adapters.safetensors")
        self.data["final"] = final
        self.save()
        plot_accuracy(self.data, self.out / "accuracy.png")
        atomic_write_text(self.out / "table.md", round_table(self.data))


def plot_accuracy(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = results["rounds"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    zs = results.get("zero_shot_accuracy")
    xs = [0] + [r["round"] for r in rounds]
    for key, zero, style, label in (("global_accuracy", zs, "o-", "global test (server)"),
                                    ("validation_accuracy", results.get("zero_shot_validation_accuracy"), "^-", "validation (server)")):
        pts = [(0, zero)] + [(r["round"], r.get(key)) for r in rounds]  # only the rounds it was scored at
        pts = [p for p in pts if p[1] is not None]
        if len(pts) > (0 if key == "global_accuracy" else 1):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, lw=2, color="black" if key == "global_accuracy" else "tab:blue",
                    label=label)
    if any("global_generated_accuracy" in r for r in rounds):  # data.scoring = "generate"
        zg = results.get("zero_shot_generated_accuracy")
        ax.plot(xs, [zg if zg is not None else float("nan")] + [r.get("global_generated_accuracy", float("nan")) for r in rounds],
                "s-", lw=2, color="tab:red", label="global test, generated answers")
    clients = sorted({c for r in rounds for c in r["client_accuracy"]}, key=int)
    for c in clients:
        pts = [(r["round"], r["client_accuracy"][c]) for r in rounds if c in r["client_accuracy"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], ".--", alpha=0.6, label=f"client {c} (local test)")
    if zs is not None:
        ax.axhline(zs, color="grey", ls=":", lw=1, label="zero-shot")
    cfg = results["config"]
    ax.set(
        xlabel="round",
        ylabel="accuracy",
        ylim=(0, 1),
        title=f"{cfg['federation']['strategy']} · {cfg['data']['num_clients']} clients · α={cfg['data']['dirichlet_alpha']}",
    )
    ax.set_xticks(xs if len(xs) <= 16 else xs[:: len(xs) // 10])
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_partition(rows: list[dict], key: str, path: Path) -> None:
    """Stacked bars: each client's training samples by the partition key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = sorted({v for r in rows for v in r[key]})
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(rows) + 2), 4), dpi=120)
    bottom = [0] * len(rows)
    cmap = plt.get_cmap("tab20")
    for j, v in enumerate(values):
        heights = [r[key].get(v, 0) for r in rows]
        ax.bar([str(r["client"]) for r in rows], heights, bottom=bottom, label=v, color=cmap(j % 20))
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set(xlabel="client", ylabel="training samples", title=f"partition by {key}")
    ax.legend(fontsize=6, ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str] | None = None) -> str:
    """A Markdown table (the first column left-aligned, numbers right-aligned unless `align` says otherwise)."""
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def round_table(results: dict[str, Any]) -> str:
    """Per-round table, pasteable into a paper or README (and, with categories, their final accuracy)."""
    generated = any("global_generated_accuracy" in r for r in results["rounds"])
    gen = (lambda v: [f"{v:.4f}" if v is not None else ""]) if generated else (lambda v: [])
    rows = []
    if results.get("zero_shot_accuracy") is not None:
        zero_gen = gen(results.get("zero_shot_generated_accuracy"))
        rows.append(["0 (zero-shot)", f"{results['zero_shot_accuracy']:.4f}", *zero_gen, "", "", "", ""])
    validated = any(r.get("validation_accuracy") is not None for r in results["rounds"])
    val = (lambda v: [f"{v:.4f}" if v is not None else ""]) if validated else (lambda v: [])
    if rows:
        rows[0][2 + generated:2 + generated] = val(results.get("zero_shot_validation_accuracy"))
    for r in results["rounds"]:
        ca = list(r["client_accuracy"].values())
        mean = f"{sum(ca) / len(ca):.4f}" if ca else ""
        loss = f"{r['train_loss']:.4f}" if r["train_loss"] is not None else ""
        acc = f"{r['global_accuracy']:.4f}" if r["global_accuracy"] is not None else ""
        rows.append([str(r["round"]), acc, *gen(r.get("global_generated_accuracy")), *val(r.get("validation_accuracy")), mean, loss,
                     f"{sum(r['bytes'].values()) / 2**20:.2f}", f"{bytes_per_client(r) / 2**20:.2f}"])
    head = ["round", "global acc.", *(["global acc. (generated)"] if generated else []), *(["validation acc."] if validated else []),
            "mean client acc.", "train loss", "MiB moved", "MiB per client"]
    out = markdown_table(head, rows, ["---:"] * len(head))
    best = (results.get("final") or {}).get("best_validation")
    if best:
        out += (f"\n\nBest validation round: {best['round']} (validation {best['validation_accuracy']:.4f}); its global test accuracy "
                f"{best['global_accuracy']:.4f}.")
    cats = results["rounds"][-1].get("global_accuracy_by_category") if results["rounds"] else None
    if cats:
        zs = results.get("zero_shot_by_category", {})
        out += "\n\n" + markdown_table(
            ["category", "zero-shot", "final global acc."], [[c, f"{zs.get(c, float('nan')):.4f}", f"{v:.4f}"] for c, v in cats.items()]
        )
    return out + "\n"
