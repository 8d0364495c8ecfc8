"""A run's tuned MLLM as a standard checkpoint: the NanoAdapters folded into the weights they act on.

Both NanoAdapters are affine maps on the LLM's input space (y = x + s B A x, s = alpha / rank), so
they fold exactly into existing weights and cost nothing at inference:

    NanoAdapter-T acts on every text-token embedding  ->  the input-embedding table
                  E' = E + s (E A^T) B^T                   (a tied output head keeps the original E)
    NanoAdapter-I acts on the connector's output      ->  the connector's last linear layer
                  W' = (I + s B A) W,  b' = (I + s B A) b

`llava` and `blip2` runs export as the same HF class they were loaded from (plain transformers
loads the folder). Composed backbones (`smol`, `compose`, `tiny`) export the whole MLLM as one transformers
folder that carries its own code (export_remote: `AutoModelForImageTextToText` and `AutoProcessor` with
`trust_remote_code=True` load it without FedNano), and the vision side again as a NanoEdge client folder
(`vision/`: encoder, folded connector, folded embedding table), which `fednano.backbones.bundle.load_nanoedge` loads.

Whose model: the run's global one, or with `client` one client's own where the method keeps one
(`local`: its adapters from the last checkpoint). The LoRA family (`fedit-lora`, `feddpa-f`) trains
no NanoAdapters: its global LoRA (and, for a FedDPA-F client, that client's personal LoRA) is merged
into the LLM with PEFT's `merge_and_unload`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fednano.backbones.bundle import BundleError, load_hf_mllm, read_safetensors
from fednano.backbones.digest import MANIFEST, held, short
from fednano.backbones.digest import digest as bundle_digest
from fednano.backbones.prepare import ensure_prepared
from fednano.backbones.registry import COMPOSED_LLM, HFMLLM, by_server_kind
from fednano.client.adapters import ADAPTER_PARAM_NAMES
from fednano.config import AdapterConfig, RunConfig, load_config
from fednano.data import system_prompt
from fednano.errors import UserError
from fednano.methods.combiners import ServerMemory
from fednano.methods.registry import method_of
from fednano.methods.whole_llm import GLOBAL, LOCAL, merge_loras, personal_lora_file

EXPORT_INFO = "fednano_export.json"  # what an exported folder holds: backbone, method, whose model, system prompt, ...


class ExportError(UserError):
    """The run cannot be exported as asked; the message says why and names the file."""


# ------------------------------------------------------------------ the maths (pure)
def fold_text_adapter(embed: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """E' = E + s (E A^T) B^T: each row of the table (V, d) through NanoAdapter-T (A: (r, d), B: (d, r)).
    Computed in float64, returned in E's dtype."""
    e = embed.double()
    return (e + scale * (e @ A.double().T) @ B.double().T).to(embed.dtype)


def fold_image_adapter(
    weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """NanoAdapter-I after a linear layer y = W x + b (W: (d, k)): M = I + s B A; -> (M W, M b)."""
    m = torch.eye(B.shape[0], dtype=torch.float64, device=B.device) + scale * B.double() @ A.double()
    w = (m @ weight.double()).to(weight.dtype)
    return w, None if bias is None else (m @ bias.double()).to(bias.dtype)


# ------------------------------------------------------------------ folding into modules
def _fold_embeddings(model: Any, state: dict[str, torch.Tensor], scale: float) -> None:
    """Fold NanoAdapter-T into `model`'s input embeddings; untie a tied output head first (it keeps E)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
        for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            cfg.tie_word_embeddings = False
    with torch.no_grad():
        emb.weight.copy_(fold_text_adapter(emb.weight, state["adapter_t.A.weight"], state["adapter_t.B.weight"], scale))


def _fold_linear(layer: nn.Linear, state: dict[str, torch.Tensor], scale: float) -> None:
    w, b = fold_image_adapter(layer.weight, layer.bias, state["adapter_i.A.weight"], state["adapter_i.B.weight"], scale)
    with torch.no_grad():
        layer.weight.copy_(w)
        if b is not None:
            layer.bias.copy_(b)


# ------------------------------------------------------------------ a run -> a folder
@dataclass
class RunModel:
    """What a run tuned, ready to fold: its config, the NanoAdapters (None: the method trains none, so they
    stay the identity), the LoRAs to merge into the LLM (name -> tensors; whole-LLM methods), and whose
    model it is (for messages)."""

    cfg: RunConfig
    adapters: dict[str, torch.Tensor] | None
    loras: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    who: str = "the global model"
    digest: str | None = None  # the client bundle the run trained with (results.json `bundle_digest`; None: a run made before digests)
    results: Path | None = None


def run_bundle(run: RunModel) -> Path:
    """The prepared bundle a run's adapters belong to: the one in the cache whose client digest is the run's (prepared
    again if none is). Another digest is another connector or embedding table: refused, both digests named."""
    if run.digest:
        found = held([run.cfg.model.resolved_cache_dir]).get(run.digest)
        if found is not None and found.name == "client" and (found.parent / "server.json").exists():
            return found.parent
    bundle = ensure_prepared(run.cfg)
    have = bundle_digest(bundle / "client")
    if run.digest and have != run.digest:
        raise ExportError(f"{run.results}: the run trained with NanoEdge bundle {short(run.digest)}, but the prepared {bundle} holds "
                          f"{short(have)} (another connector or embedding table): use the run's bundle (its server's cache)")
    return bundle


def read_run(run_dir: Path, client: int | None = None, client_state: Path | None = None) -> RunModel:
    """A finished run's tuned model: the global one, or (`client`) one client's own where the method keeps
    one (`local`: its adapters from the last checkpoint; `feddpa-f`: the global LoRA plus its personal LoRA
    from `client_state`, default RUN_DIR/client-state). Errors name the file and say what to do."""
    run_dir = Path(run_dir)
    cfg_path, adapters = run_dir / "config.toml", run_dir / "adapters.safetensors"
    if not cfg_path.exists():
        raise ExportError(f"{cfg_path} not found: not a FedNano results folder")
    if not adapters.exists():
        raise ExportError(f"{adapters} not found: the run has not finished (`fednano run --resume {run_dir}` completes it)")
    cfg, state = load_config(cfg_path), read_safetensors(adapters)
    results = run_dir / "results.json"
    digest = json.loads(results.read_text()).get("bundle_digest") if results.exists() else None
    found = _read_run(run_dir, cfg, state, client, client_state)
    found.digest, found.results = digest, results
    return found


def _read_run(run_dir: Path, cfg: RunConfig, state: dict[str, torch.Tensor], client: int | None, client_state: Path | None) -> RunModel:
    method, adapters = method_of(cfg), run_dir / "adapters.safetensors"
    lora = method.trains.in_llm  # the method trains LoRA inside the LLM, not the NanoAdapters
    if lora and not (state and all(".lora_" in k for k in state)):
        raise ExportError(f"{adapters}: holds {sorted(state)[:3]}..., not the LoRA method {method.name!r} trains")
    if not lora and set(state) != set(ADAPTER_PARAM_NAMES):
        raise ExportError(f"{adapters}: holds {sorted(state)[:3]}..., not the NanoAdapters {list(ADAPTER_PARAM_NAMES)} "
                          f"method {method.name!r} trains")
    if client is None:
        if method.topology.personal_models:
            raise ExportError(f"{run_dir}: method {method.name!r} trains no global model, each client its own: "
                              f"pass --client ID (one of {sorted(_local_clients(run_dir))})")
        return RunModel(cfg, None, {GLOBAL: state}) if lora else RunModel(cfg, state)
    who = f"client {client}'s model"
    if method.topology.personal_models:
        own = _local_clients(run_dir)
        if client not in own:
            raise ExportError(f"{run_dir}: no client {client} in the last checkpoint; its clients are {sorted(own)}")
        return RunModel(cfg, own[client], who=who)
    if method.trains.personal:
        path = personal_lora_file(client_state or run_dir / "client-state", client)
        if not path.exists():
            raise ExportError(f"{path} not found: client {client}'s personal LoRA (for a deployed node, pass --client-state "
                              "with that node's state-dir)")
        return RunModel(cfg, None, {GLOBAL: state, LOCAL: read_safetensors(path)}, who)
    raise ExportError(f"method {method.name!r} merges every client into one global model and keeps no per-client model: "
                      "export without --client")


def _local_clients(run_dir: Path) -> dict[int, dict[str, torch.Tensor]]:
    """Each client's own adapters from the run's last checkpoint (methods that merge nothing)."""
    results = run_dir / "results.json"
    ck = json.loads(results.read_text()).get("checkpoint", {}) if results.exists() else {}
    if not ck.get("strategy") or not (run_dir / ck["strategy"]).exists():
        raise ExportError(f"{results}: no checkpoint with the clients' adapters (was the run completed with this version?)")
    memory = ServerMemory()
    memory.load_state_dict(read_safetensors(run_dir / ck["strategy"]))
    return memory.clients


def export_run(run_dir: Path, out: Path, client: int | None = None, client_state: Path | None = None) -> Path:
    """Write the run's tuned MLLM (the global model, or `client`'s own) to `out` (created; must not hold files)."""
    run = read_run(run_dir, client, client_state)
    return export_model(run.cfg, run.adapters, out, run.loras, run.who, bundle=run_bundle(run))


def export_model(cfg: RunConfig, state: dict[str, torch.Tensor] | None, out: Path,
                 loras: dict[str, dict[str, torch.Tensor]] | None = None, who: str = "the global model",
                 bundle: Path | None = None) -> Path:
    """`cfg`'s backbone with the NanoAdapters `state` folded in (None: none) and `loras` merged, written to `out`
    (from `bundle`, default the one `cfg` prepares)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out}: not empty; choose a new folder")
    bundle = bundle or ensure_prepared(cfg)
    server = json.loads((bundle / "server.json").read_text())
    if server.get("random_init"):
        raise ExportError(f"{bundle}: the run used random weights (model.random_init); there is nothing to export")
    tuned = Tuning(state, loras or {}, cfg.adapter)
    backbone = by_server_kind(server.get("kind", COMPOSED_LLM))
    source = Path(server["path"]) if Path(server["path"]).is_absolute() else bundle / server["path"]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    backbone.export(bundle, source, tuned, tmp, system_prompt(cfg.data.dataset))
    (tmp / EXPORT_INFO).write_text(json.dumps({
        "backbone": cfg.model.backbone, "kind": backbone.server_kind, "method": cfg.federation.strategy, "model": who,
        "llm_dtype": cfg.model.llm_dtype, "adapter_scale": tuned.scale, "loras_merged": list(tuned.loras), "source": str(source),
        "system": system_prompt(cfg.data.dataset), "layout": backbone.export_layout,
    }, indent=2))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


@dataclass
class Tuning:
    """What is folded into a loaded model: NanoAdapters (or none) and LoRAs (merged first)."""

    adapters: dict[str, torch.Tensor] | None
    loras: dict[str, dict[str, torch.Tensor]]
    adapter_cfg: AdapterConfig

    @property
    def scale(self) -> float:
        return self.adapter_cfg.alpha / self.adapter_cfg.rank

    def into_llm(self, model: Any, where: str) -> Any:
        """Merge the LoRAs (PEFT's merge_and_unload), then fold NanoAdapter-T into the input embeddings."""
        if self.loras:
            try:
                model = merge_loras(model, self.adapter_cfg, self.loras, where)
            except ValueError as e:
                raise ExportError(str(e)) from None
        if self.adapters is not None:
            _fold_embeddings(model, self.adapters, self.scale)
        return model


def _copy_missing(src: Path, dst: Path) -> None:
    """The checkpoint's other files (processor, tokenizer, chat template), where the export has none."""
    for f in src.iterdir():
        weights = f.suffix in (".safetensors", ".bin") or f.name.endswith(".index.json")
        if f.is_file() and not weights and not (dst / f.name).exists():
            shutil.copy2(f, dst / f.name)


def export_hf_mllm(source: Path, family: HFMLLM, tuned: Tuning, out: Path) -> None:
    """NanoAdapter-I into the connector's last linear layer (LLaVA: multi_modal_projector.linear_2; BLIP-2:
    language_projection), NanoAdapter-T into the embedding table, LoRAs merged: a checkpoint of the same family."""
    model, tok = load_hf_mllm(source, family.name, dtype="auto")
    model = tuned.into_llm(model, str(source))
    if tuned.adapters is not None:
        _fold_linear(family.projector(model), tuned.adapters, tuned.scale)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    _copy_missing(source, out)


def export_composed(client_dir: Path, llm_dir: Path, tuned: Tuning, out: Path, system: str) -> None:
    """The NanoEdge folder `vision/` (connector and embedding table folded), then the whole MLLM as one transformers
    folder with its own code (export_remote: encoder, folded connector, the LLM with embeddings folded, head untied)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fednano.export_remote import write_remote_model

    if not (llm_dir / "config.json").exists():
        raise BundleError(f"{llm_dir}: the run's LLM folder is gone (config.json missing)")
    model = tuned.into_llm(AutoModelForCausalLM.from_pretrained(llm_dir, dtype="auto"), str(llm_dir))
    shutil.copytree(client_dir, out / "vision", ignore=shutil.ignore_patterns(MANIFEST))  # its files change: not the bundle's digest
    _fold_nanoedge(client_dir, tuned, out / "vision")
    write_remote_model(out, model, AutoTokenizer.from_pretrained(llm_dir), out / "vision", system)


def _fold_nanoedge(client_dir: Path, tuned: Tuning, out: Path) -> None:
    """NanoAdapter-I into the NanoEdge folder's connector, NanoAdapter-T into its embedding table."""
    from safetensors.torch import save_file

    if tuned.adapters is None:
        return
    state, scale = tuned.adapters, tuned.scale
    conn = read_safetensors(client_dir / "connector.safetensors")
    last = max(int(k.split(".")[0]) for k in conn)  # the Connector is Linear-GELU-Linear: its last layer
    w, b = fold_image_adapter(conn[f"{last}.weight"], conn.get(f"{last}.bias"), state["adapter_i.A.weight"],
                              state["adapter_i.B.weight"], scale)
    conn[f"{last}.weight"] = w
    if b is not None:
        conn[f"{last}.bias"] = b
    save_file({k: v.contiguous() for k, v in conn.items()}, out / "connector.safetensors")
    table = read_safetensors(client_dir / "embeddings.safetensors")["weight"]
    save_file({"weight": fold_text_adapter(table, state["adapter_t.A.weight"], state["adapter_t.B.weight"], scale)},
              out / "embeddings.safetensors")
