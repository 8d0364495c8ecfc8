"""Device-aware code, checked on the CPU: device names, where tensors are made, loading straight
into dtype and device, sharding, random weights at a real configuration's shape, the vectorised
Fisher, and micro-batches sized by tokens. The CUDA paths run the same code (see `device`)."""

import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fednano.backbones.bundle import load_nanoedge, load_server_llm
from fednano.backbones.prepare import ensure_prepared
from fednano.backbones.tiny import tiny_llava_config, tiny_tokenizer
from fednano.client.features import ImageFeatures, Workload
from fednano.client.fisher import adapter_sample_grads, empirical_fisher
from fednano.config import ConfigError, load_config
from fednano.data.easyvqa import SYSTEM_PROMPT, load_split
from fednano.data.prompts import IGNORE_INDEX
from fednano.devices import resolve_device
from fednano.server.llm import ServerLLM
from fednano.split.server import LLMWorker
from tests.conftest import TINY, randomize_adapters

NO_GPU = not torch.cuda.is_available()


# ------------------------------------------------------------------ device names
def test_process_age_counts_from_the_process_start():
    import subprocess
    import sys

    code = "import time; time.sleep(1.0); from fednano.devices import process_age; print(process_age())"
    out = subprocess.run([sys.executable, "-c", code],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    assert 1.0 <= float(out) < 20.0


def test_auto_is_the_cpu_without_a_gpu_and_names_are_checked():
    if NO_GPU:
        assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="model.server_device: 'gpu' is not a device"):
        resolve_device("gpu", "model.server_device")


@pytest.mark.skipif(not NO_GPU, reason="needs a machine without a CUDA GPU")
def test_asking_for_cuda_without_one_names_the_field():
    with pytest.raises(ConfigError, match="model.client_device: 'cuda:1' asked for, but this process sees no CUDA GPU"):
        resolve_device("cuda:1", "model.client_device")


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("model.server_device", "gpu0", "model.server_device"),
    ("model.client_device", "cuda:x", "model.client_device"),
    ("model.server_device_map", "everywhere", "model.server_device_map"),
    ("federation.client_gpus", 1.5, "federation.client_gpus"),
    ("federation.client_gpus", -0.5, "federation.client_gpus"),
    ("split.max_batch_tokens", 0, "split.max_batch_tokens"),
    ("model.random_init", True, "model.random_init"),  # the tiny backbone has no configuration to take shapes from
])
def test_bad_device_settings_are_refused_with_the_field_named(key, value, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(TINY, {key: value})


@pytest.mark.skipif(not NO_GPU, reason="needs a machine without a CUDA GPU")
def test_simulated_clients_on_gpus_without_a_gpu_is_a_clear_error(tiny_cfg, tmp_path):
    from dataclasses import replace

    from fednano.federation.simulation import simulate

    cfg = replace(tiny_cfg, federation=replace(tiny_cfg.federation, client_gpus=0.5))
    with pytest.raises(ConfigError, match="federation.client_gpus=0.5: this machine has no CUDA GPU"):
        simulate(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "results.json").exists()  # refused before anything started


# ------------------------------------------------------------------ where tensors are made
class _Cache:
    """Keys and values of one layer, kept as HF's DynamicCache keeps them (rows, heads, tokens, dim)."""

    def __init__(self, h: torch.Tensor) -> None:
        kv = h[:, None, :, :]
        self.layers = [SimpleNamespace(keys=kv, values=kv)]

    def batch_repeat_interleave(self, k: int) -> None:
        for layer in self.layers:
            layer.keys = layer.values = layer.keys.repeat_interleave(k, 0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer in self.layers:
            layer.keys = layer.values = layer.keys[indices, ...]

    def crop(self, tokens_to_remove: int) -> None:
        for layer in self.layers:
            layer.keys = layer.values = layer.keys[..., :tokens_to_remove, :]


class _Decoder(torch.nn.Module):
    """A stand-in decoder (HF's own Llama is device-aware, but asks the host about its masks, which
    the meta device cannot answer): what is under test is FedNano's code around it."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(d, d)

    def forward(self, inputs_embeds, attention_mask, position_ids=None, past_key_values=None, use_cache=False):
        h = self.proj(inputs_embeds) * attention_mask[:, -inputs_embeds.shape[1]:, None]
        if position_ids is not None:
            h = h + position_ids[..., None]
        return SimpleNamespace(last_hidden_state=h, past_key_values=past_key_values or _Cache(h))


@pytest.fixture(autouse=False)
def meta_masks():
    """Boolean-mask indexing has a data-dependent shape, which the meta device cannot know; torch's
    own switch makes it assume every element is selected (shapes stay consistent; values are moot)."""
    from torch.fx.experimental import _config

    with _config.patch(meta_nonzero_assume_all_nonzero=True):
        yield


def _meta_llm() -> ServerLLM:
    """A ServerLLM on PyTorch's meta device: any tensor the step made on the CPU instead of where
    the LLM lives would meet a meta tensor and fail ('same device')."""
    from transformers import LlamaConfig

    with torch.device("meta"):
        model = torch.nn.Module()
        model.decoder, model.head = _Decoder(8), torch.nn.Linear(8, 20, bias=False)
    model.config = LlamaConfig(hidden_size=8, vocab_size=20, num_attention_heads=2, num_key_value_heads=2)
    return ServerLLM(model, torch.float32, decoder=model.decoder, head=model.head)


def test_the_server_step_makes_every_tensor_on_the_llms_device(meta_masks):
    llm = _meta_llm()
    assert llm.device.type == "meta"
    g = torch.Generator().manual_seed(0)
    reqs = []
    for B, T, red in ((2, 7, "mean"), (1, 5, "sum")):  # as decoded from the wire: CPU tensors
        labels = torch.full((B, T), IGNORE_INDEX)
        labels[:, -2:] = torch.randint(0, 10, (B, 2), generator=g)
        reqs.append((torch.randn(B, T, llm.hidden_size, generator=g), torch.ones(B, T, dtype=torch.long), labels, red))
    out = llm.train_steps(reqs)
    assert [tuple(gr.shape) for _, gr, _ in out] == [(2, 7, llm.hidden_size), (1, 5, llm.hidden_size)]
    assert all(gr.device.type == "meta" and loss.device.type == "meta" for loss, gr, _ in out)
    assert [n for _, _, n in out] == [4, 2]  # label tokens, counted on the host


@pytest.mark.parametrize("max_cache_bytes", [None, 1])  # all candidates in one pass; one at a time
def test_scoring_makes_every_tensor_on_the_llms_device(meta_masks, max_cache_bytes):
    llm = _meta_llm()
    d = llm.hidden_size
    lp = llm.score(torch.randn(2, 6, d), torch.ones(2, 6, dtype=torch.long), torch.randn(3, 2, d),
                   torch.randint(0, 10, (3, 2)), torch.ones(3, 2, dtype=torch.long), max_cache_bytes=max_cache_bytes)
    assert lp.shape == (2, 3) and lp.device.type == "meta"


# ------------------------------------------------------------------ loading
def test_the_llm_is_loaded_straight_into_its_dtype_and_device(tiny_bundle):
    llm = load_server_llm(tiny_bundle, torch.bfloat16, "cpu")
    assert {p.dtype for p in llm.model.parameters()} == {torch.bfloat16}
    assert llm.device == torch.device("cpu")


def test_the_clients_embedding_table_does_not_depend_on_the_servers_dtype(tiny_cache, tmp_path):
    """The bundle's table comes from the checkpoint in float32 even when the LLM is loaded in bf16."""
    from safetensors.torch import load_file

    from fednano.backbones.bundle import load_llm

    bundles = {}
    for dtype in ("float32", "bfloat16"):
        cfg = load_config(TINY, {"model.cache_dir": str(tmp_path / dtype), "model.llm_dtype": dtype, "prepare.steps": 0})
        bundles[dtype] = load_file(ensure_prepared(cfg) / "client" / "embeddings.safetensors")["weight"]
    ref, _ = load_llm(ensure_prepared(cfg) / "llm", torch.float32)
    assert bundles["bfloat16"].dtype == torch.float32
    assert torch.equal(bundles["bfloat16"], bundles["float32"])
    assert torch.equal(bundles["float32"], ref.get_input_embeddings().weight)


def _step(llm: ServerLLM):
    g = torch.Generator().manual_seed(1)
    labels = torch.full((2, 6), IGNORE_INDEX)
    labels[:, 3:5] = 5
    return llm.train_step(torch.randn(2, 6, llm.hidden_size, generator=g), torch.ones(2, 6, dtype=torch.long), labels, "mean")


def test_a_sharded_llm_steps_exactly_like_the_whole_one(tiny_bundle, tmp_path):
    """A model dispatched by accelerate (one decoder layer offloaded to disk: the CPU's stand-in
    for a second GPU, with the same hooks moving activations between shards) gives the same
    loss and gradient; and `server_device_map` loads through the same path."""
    from transformers import AutoModelForCausalLM

    whole = load_server_llm(tiny_bundle, torch.float32, "cpu")
    shards = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
              "model.norm": "cpu", "lm_head": "cpu"}
    dispatched = AutoModelForCausalLM.from_pretrained(tiny_bundle / "llm", dtype=torch.float32, device_map=shards, offload_folder=tmp_path)
    assert dispatched.hf_device_map["model.layers.1"] == "disk"
    by_policy = load_server_llm(tiny_bundle, torch.float32, "cpu", device_map="auto")
    ref_loss, ref_grad, n = _step(whole)
    for llm in (ServerLLM(dispatched, torch.float32), by_policy):
        loss, grad, m = _step(llm)
        assert m == n
        torch.testing.assert_close(loss, ref_loss)
        torch.testing.assert_close(grad, ref_grad)


# ------------------------------------------------------------------ random weights at a real shape
@pytest.fixture(scope="module")
def llava_config_dir(tmp_path_factory) -> Path:
    """A folder with only config.json (no weights, no tokenizer), as a user would hold for a shape."""
    d = tmp_path_factory.mktemp("llava-config")
    tiny_llava_config(tiny_tokenizer(chat_template=False, extra_specials=("<image>",))).save_pretrained(d)
    assert not list(d.glob("*.safetensors"))
    return d


def test_random_init_builds_both_sides_from_a_configuration(llava_config_dir, tiny_cache):
    cfg = load_config(TINY, {"model.cache_dir": str(tiny_cache), "model.backbone": "llava", "model.checkpoint": str(llava_config_dir),
                             "model.random_init": True})
    bundle = ensure_prepared(cfg)
    server = json.loads((bundle / "server.json").read_text())
    assert server["random_init"] and "path" not in server  # nothing on disk: the server builds it
    llm = load_server_llm(bundle, torch.bfloat16, "cpu")
    assert {p.dtype for p in llm.model.parameters()} == {torch.bfloat16}
    assert llm.hidden_size == 32 and not any("vision" in n for n, _ in llm.model.named_parameters())
    again = load_server_llm(bundle, torch.bfloat16, "cpu")  # seeded: both loads agree
    assert all(torch.equal(a, b) for a, b in zip(llm.model.parameters(), again.model.parameters(), strict=True))
    client = load_nanoedge(bundle / "client", cfg.adapter)
    assert client.edge.num_visual_tokens == 16 and client.meta["random_init"]


def test_random_init_refuses_a_shipped_config_of_the_other_family(tiny_cache):
    from fednano.backbones.bundle import BundleError

    cfg = load_config(TINY, {"model.cache_dir": str(tiny_cache), "model.backbone": "blip2", "model.checkpoint": "llava-1.5-7b",
                             "model.random_init": True})
    with pytest.raises(BundleError, match="'llava-1.5-7b' is a llava model, not blip2"):
        ensure_prepared(cfg)


def test_shipped_paper_configs_build_on_the_meta_device():
    """The 7B shapes the dry run builds (here without memory: on the meta device)."""
    from fednano.backbones.bundle import random_causal_lm, random_mllm_config

    for name, backbone in (("llava-1.5-7b", "llava"), ("minigpt4", "blip2")):
        cfg, tok = random_mllm_config(name, backbone)
        lm = random_causal_lm(cfg.to_dict(), backbone, torch.bfloat16, "meta", 0)
        n = sum(p.numel() for p in lm.parameters())
        assert 6.6e9 < n < 6.8e9, (name, n)
        assert max(tok.get_vocab().values()) < cfg.get_text_config().vocab_size


# ------------------------------------------------------------------ the vectorised Fisher
def _loop_fisher(edge, llm, batch, feats, weights):
    """The reference: one autograd backward per sample (what the closed form replaces)."""
    params = edge.adapter_parameters()
    acc = {k: torch.zeros_like(p) for k, p in params.items()}
    embeds = edge.embed(batch.input_ids, feats)
    _, grad, _ = llm.train_step(embeds, batch.attention_mask, batch.labels, reduction="sum")
    for i in range(embeds.shape[0]):
        gs = torch.autograd.grad(embeds[i], list(params.values()), grad_outputs=grad[i], retain_graph=True, allow_unused=True)
        for k, g, p in zip(params, gs, params.values(), strict=True):
            acc[k] += float(weights[i]) * (g if g is not None else torch.zeros_like(p)) ** 2
    return {k: v / float(weights.sum()) for k, v in acc.items()}


@pytest.mark.parametrize("weighted", [False, True], ids=["empirical", "exact-weights"])
def test_vectorised_fisher_equals_the_per_sample_backward_loop(tiny_edge, tiny_llm, weighted):
    edge = tiny_edge.edge
    randomize_adapters(edge, seed=4)
    edge.eval()
    work = Workload(tiny_edge.tokenizer, ImageFeatures(edge.vision), edge.num_visual_tokens, SYSTEM_PROMPT)
    batch, feats = work.train_batch(list(load_split("train")[:5]))
    weights = torch.tensor([0.1, 0.9, 0.5, 0.5, 1.0]) if weighted else torch.ones(5)
    ref = _loop_fisher(edge, tiny_llm, batch, feats, weights)
    got, n = empirical_fisher(edge, tiny_llm, [(batch, feats, weights)] if weighted else [(batch, feats)])
    assert n == pytest.approx(float(weights.sum()))
    for k in ref:
        assert ref[k].abs().max() > 0
        torch.testing.assert_close(got[k], ref[k], atol=1e-9, rtol=1e-4)


def test_adapter_sample_grads_against_hand_computed_values():
    """d=2, r=1, s=2, one sample, one position: dL/dB = s g (A x)^T, dL/dA = s (B^T g) x^T."""
    from fednano.client.adapters import NanoAdapter

    ad = NanoAdapter(2, 1, alpha=2.0)
    with torch.no_grad():
        ad.A.weight.copy_(torch.tensor([[1.0, 2.0]]))
        ad.B.weight.copy_(torch.tensor([[3.0], [-1.0]]))
    x, g = torch.tensor([[[1.0, 1.0]]]), torch.tensor([[[0.5, 2.0]]])
    out = adapter_sample_grads(ad, x, g)
    # A x = 3; B^T g = 3*0.5 - 1*2 = -0.5
    torch.testing.assert_close(out["B.weight"], torch.tensor([[[2 * 0.5 * 3], [2 * 2.0 * 3]]]))
    torch.testing.assert_close(out["A.weight"], torch.tensor([[[2 * -0.5 * 1, 2 * -0.5 * 1]]]))


# ------------------------------------------------------------------ micro-batches sized by tokens
class _RecordingLLM:
    """Stands in for ServerLLM inside the worker: records which requests shared a pass. The first
    pass waits at a gate, so the others queue up behind it."""

    def __init__(self) -> None:
        self.passes: list[list[int]] = []
        self.entered, self.gate = threading.Event(), threading.Event()

    def train_steps(self, reqs):
        self.entered.set()
        self.gate.wait(10)
        self.passes.append([int(r[3]) for r in reqs])
        return [(torch.zeros(()), torch.zeros(1), 1) for _ in reqs]


def test_micro_batches_grow_up_to_the_token_budget_in_arrival_order():
    from concurrent.futures import Future

    llm = _RecordingLLM()
    worker = LLMWorker(llm, max_tokens=100, batching=True, window_s=0.0, active=lambda: 99)  # type: ignore[arg-type]

    def submit(i: int, rows: int, tokens: int) -> Future:
        fut: Future = Future()
        worker._queue.put(("train", (torch.zeros(rows, tokens, 1), None, None, i), fut))
        return fut

    shapes = [(2, 10), (3, 10), (4, 10), (1, 40), (2, 30), (1, 5)]  # rows x tokens
    futures = [submit(0, *shapes[0])]
    assert llm.entered.wait(10)  # the worker is busy with request 0; the rest wait in the queue
    futures += [submit(i, *shape) for i, shape in enumerate(shapes[1:], 1)]
    llm.gate.set()
    for f in futures:
        f.result(10)
    worker.stop()
    # 1+2: 7 rows x 10 = 70 <= 100; adding 3 would make 8 x 40 = 320. 3+4: 3 x 40 = 120 > 100.
    # 4+5: 3 rows x 30 = 90. Nobody overtakes a request that did not fit.
    assert llm.passes == [[0], [1, 2], [3], [4, 5]]
    assert worker.steps == {"train_requests": 6, "llm_passes": 4}


def test_a_random_weight_run_is_marked_and_left_out_of_reports(llava_config_dir, tiny_cache, tmp_path):
    """The dry run's path, at tiny shapes: `fednano run` with model.random_init completes, records
    where each side ran and that its weights were random; `fednano report` refuses its accuracy."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "dry"
    env = {**os.environ, "FEDNANO_CACHE": str(tiny_cache), "FEDNANO_PROGRESS": "off"}
    run = [sys.executable, "-m", "fednano", "run", "--config", str(TINY), "--output", str(out), "--backbone", "llava",
           "--checkpoint", str(llava_config_dir), "--set", "model.random_init=true", "--set", "federation.rounds=1"]
    proc = subprocess.run(run, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["final"]["random_weights"] is True
    assert res["rounds"][0]["split_steps"] > 0 and res["rounds"][0]["bytes"]["activations_up"] > 0
    assert set(res["final"]["devices"]["clients"]) == {"0", "1"}
    rep = subprocess.run([sys.executable, "-m", "fednano", "report", str(out), "--output", str(tmp_path / "report")],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert "random weights (model.random_init)" in rep.stdout + rep.stderr


@pytest.mark.skipif(not NO_GPU, reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize(("sets", "needle"), [
    (["model.server_device='cuda'"], "model.server_device: 'cuda' asked for, but this process sees no CUDA GPU"),
    (["model.client_device='cuda:0'", "federation.client_gpus=0"], "simulated clients see no GPU unless federation.client_gpus > 0"),
])
def test_fednano_run_refuses_devices_it_cannot_have_in_one_line(tmp_path, sets, needle):
    import subprocess
    import sys

    from tests.conftest import ROOT

    args = [a for s in sets for a in ("--set", s)]
    proc = subprocess.run([sys.executable, "-m", "fednano", "run", "--config", str(TINY), "--output", str(tmp_path / "run"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and needle in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
