"""Every backbone FedNano builds: one entry each, carrying what differs between them.

    check         the config fields it needs (config.py asks, as it asks Method.check)
    check_source  its source is there (the server's preflight, before anything is prepared)
    cache_key     what its prepared bundle depends on (prepare.bundle_dir)
    prepare       build the bundle: client/ (the NanoEdge) + server.json (what the server loads)
    load_client   rebuild its NanoEdge's encoder and connector from client/ alone
    load_server   load the frozen LLM server.json names
    export        write the tuned MLLM as a standard checkpoint; load_export reads it back
    footprint_model  its parameters per side, built on the meta device from a shipped configuration

Two families: composed (`smol`, `tiny`, `compose`: a vision encoder + an MLP connector pre-trained by stage-1
alignment + a causal LM) and whole HF MLLMs split at the connector (`llava`, `blip2`, and `idefics3` in its own
file, backbones/idefics3.py). Callers ask the entry;
nothing compares backbone names. A new HF VLM family is one `HFMLLM` subclass in its own file, registered below.

This module imports only the standard library (config.py takes its names from here); each method imports what
it runs. A bundle records its layout (`nanoedge.json` "kind", `server.json` "kind"), and `by_client_kind` /
`by_server_kind` find the entry that reads it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from fednano.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fednano.backbones.bundle import ClientBundle
    from fednano.config import ModelConfig, RunConfig
    from fednano.export import Tuning
    from fednano.server.llm import ServerLLM


COMPOSED = "compose"  # the composed family's client/ layout (nanoedge.json "kind")
COMPOSED_LLM = "causal-lm"  # and its server LLM (server.json "kind")


def absolute(path: str) -> str:
    return str(Path(os.path.expanduser(path)).resolve()) if path else ""


@dataclass(frozen=True)
class Backbone:
    name: str
    takes_random_init: ClassVar[bool] = False  # model.random_init: random weights at a configuration's shape
    source_field: ClassVar[str] = "model.checkpoint"  # the field naming its source, in preflight's errors

    @property
    def client_kind(self) -> str:
        """nanoedge.json "kind": how client/ is laid out."""
        raise NotImplementedError

    @property
    def server_kind(self) -> str:
        """server.json "kind": how the server loads its LLM (an export records it too)."""
        raise NotImplementedError

    @property
    def export_layout(self) -> str:
        """What an export of it is (fednano_export.json "layout")."""
        raise NotImplementedError

    # --- the config and the source ---------------------------------------------------------
    def check(self, m: ModelConfig) -> None:
        """Refuse model settings this backbone cannot honour (ConfigError naming the field)."""
        if m.random_init and not self.takes_random_init:
            shaped = [b.name for b in BACKBONES.values() if b.takes_random_init]
            names = ", ".join(shaped[:-1]) + " and " + shaped[-1]
            raise ConfigError(f"model.random_init: only for the {names} backbones (their shapes come from a configuration)")

    def check_source(self, m: ModelConfig) -> None:
        """Raise BundleError if the source this backbone prepares from is missing or malformed."""

    # --- preparing, on the side that holds the LLM ----------------------------------------
    def cache_key(self, cfg: RunConfig) -> dict:
        raise NotImplementedError

    def prepare(self, cfg: RunConfig, tmp: Path) -> tuple[dict, dict]:
        """Write `tmp/client` (and any server files under `tmp`): -> (server.json, what prepare.json reports)."""
        raise NotImplementedError

    # --- loading each side ------------------------------------------------------------------
    def load_client(self, meta: dict, client_dir: Path, hidden: int) -> tuple[nn.Module, nn.Module, int]:
        """(vision encoder, connector, visual tokens per image) from client/ alone (no LLM weight)."""
        raise NotImplementedError

    def load_server(self, path: Path, dtype: torch.dtype, device: torch.device | str, device_map: str) -> ServerLLM:
        raise NotImplementedError

    # --- export -------------------------------------------------------------------------------
    def export(self, bundle: Path, source: Path, tuned: Tuning, out: Path, system: str) -> None:
        raise NotImplementedError

    def load_export(self, path: Path, dtype: torch.dtype, device: torch.device) -> tuple[ClientBundle, ServerLLM]:
        raise NotImplementedError

    # --- the paper's footprint -----------------------------------------------------------
    def footprint_model(self, filename: str | None) -> tuple[Any, int, int, int]:
        """(model, vision encoder parameters, connector parameters, visual tokens per image); call on the meta device."""
        raise ValueError(f"backbone {self.name!r} has no footprint configuration")


# ============================================================================ composed
@dataclass(frozen=True)
class Composed(Backbone):
    """A vision encoder FedNano knows + an MLP connector pre-trained here + a causal LM."""

    @property
    def client_kind(self) -> str:
        return COMPOSED

    @property
    def server_kind(self) -> str:
        return COMPOSED_LLM

    @property
    def export_layout(self) -> str:
        return "transformers remote code (FedNanoForConditionalGeneration), NanoEdge in vision/"

    def llm(self, cfg: RunConfig, tmp: Path) -> tuple[Path, str | None]:
        """(the causal LM's folder, its path as server.json records it when not that folder)."""
        raise NotImplementedError

    def vision(self, cfg: RunConfig) -> tuple[dict, dict | None]:
        """(the encoder's spec, its weights when they are not a package's)."""
        return {"type": cfg.model.vision_encoder}, None

    def cache_key(self, cfg: RunConfig) -> dict:
        from fednano.backbones.prepare import COMPOSE_VERSION

        m = cfg.model
        model = {"backbone": m.backbone, "visual_grid": m.visual_grid, "image_size": m.image_size, "llm_path": absolute(m.llm_path),
                 "vision_encoder": m.vision_encoder}
        return {"model": model, "prepare": cfg.prepare.__dict__, "version": COMPOSE_VERSION}

    def prepare(self, cfg: RunConfig, tmp: Path) -> tuple[dict, dict]:
        from fednano.backbones.prepare import prepare_compose

        llm_dir, server_path = self.llm(cfg, tmp)
        vision_spec, vision_state = self.vision(cfg)
        report = prepare_compose(cfg, tmp / "client", llm_dir, vision_spec, vision_state)
        return {"kind": self.server_kind, "path": server_path or str(llm_dir)}, report

    def load_client(self, meta: dict, client_dir: Path, hidden: int) -> tuple[nn.Module, nn.Module, int]:
        from fednano.backbones.bundle import read_safetensors, require
        from fednano.client.connector import Connector
        from fednano.client.vision import build_vision_encoder

        vision_state = read_safetensors(client_dir / "vision.safetensors") if (client_dir / "vision.safetensors").exists() else None
        vision = build_vision_encoder(meta["vision"], meta["image_size"], meta["visual_grid"], vision_state)
        connector = Connector(vision.feature_dim, hidden)
        connector.load_state_dict(read_safetensors(require(client_dir / "connector.safetensors", "connector weights")))
        return vision, connector, vision.num_tokens

    def load_server(self, path: Path, dtype: torch.dtype, device: torch.device | str, device_map: str) -> ServerLLM:
        from fednano.backbones.bundle import load_llm
        from fednano.server.llm import ServerLLM

        return ServerLLM(load_llm(path, dtype, device, device_map)[0], dtype)

    def export(self, bundle: Path, source: Path, tuned: Tuning, out: Path, system: str) -> None:
        from fednano.export import export_composed

        export_composed(bundle / "client", source, tuned, out, system)

    def load_export(self, path: Path, dtype: torch.dtype, device: torch.device) -> tuple[ClientBundle, ServerLLM]:
        """The remote-code folder's LLM (its code not run) + vision/; before it: llm/ + vision/."""
        from fednano.backbones.bundle import load_llm, load_nanoedge
        from fednano.config import AdapterConfig
        from fednano.export_remote import load_exported_llm
        from fednano.server.llm import ServerLLM

        side = load_nanoedge(path / "vision", AdapterConfig(), device)
        old = (path / "llm" / "config.json").exists()
        return side, ServerLLM(load_llm(path / "llm", dtype, device)[0] if old else load_exported_llm(path, dtype, device), dtype)


@dataclass(frozen=True)
class Compose(Composed):
    """Any local HF causal LM at model.llm_path."""

    source_field: ClassVar[str] = "model.llm_path"

    def check(self, m: ModelConfig) -> None:
        super().check(m)
        if not m.llm_path:
            raise ConfigError(f"model.llm_path: backbone {self.name!r} needs the path of a local causal LM")

    def check_source(self, m: ModelConfig) -> None:
        from fednano.backbones.bundle import check_checkpoint

        check_checkpoint(Path(m.llm_path).expanduser())

    def llm(self, cfg: RunConfig, tmp: Path) -> tuple[Path, str | None]:
        return Path(absolute(cfg.model.llm_path)), None


@dataclass(frozen=True)
class Smol(Composed):
    """SmolLM2-135M-Instruct, dequantised once from the GGUF in its package."""

    def check_source(self, m: ModelConfig) -> None:
        from fednano.backbones.bundle import smollm2_gguf_path

        smollm2_gguf_path()

    def llm(self, cfg: RunConfig, tmp: Path) -> tuple[Path, str | None]:
        from fednano.backbones.bundle import convert_smollm2

        return convert_smollm2(cfg.model.resolved_cache_dir / "smollm2-135m-instruct"), None

    def footprint_model(self, filename: str | None) -> tuple[Any, int, int, int]:
        from fednano.backbones.footprint import smol_meta

        return smol_meta()


@dataclass(frozen=True)
class Tiny(Composed):
    """Random tiny models (a 2-layer Llama and a small CNN), written into the bundle: for tests."""

    def llm(self, cfg: RunConfig, tmp: Path) -> tuple[Path, str | None]:
        from fednano.backbones.tiny import build_tiny_llm

        return build_tiny_llm(tmp / "llm", seed=cfg.prepare.seed), "llm"

    def vision(self, cfg: RunConfig) -> tuple[dict, dict | None]:
        import torch

        from fednano.client.vision import TinyCNN

        torch.manual_seed(cfg.prepare.seed)
        return {"type": "tiny-cnn", "channels": 16}, TinyCNN(16).state_dict()


# ============================================================================ whole HF MLLMs
@dataclass(frozen=True)
class HFMLLM(Backbone):
    """A local transformers MLLM checkpoint split at the connector: its vision tower and connector go to the client,
    its language model and head stay on the server. A subclass names its classes and where its parts are."""

    model_type: ClassVar[str]  # config.json's model_type
    takes_random_init: ClassVar[bool] = True

    @property
    def client_kind(self) -> str:
        return self.name

    @property
    def server_kind(self) -> str:
        return self.name

    @property
    def export_layout(self) -> str:
        return f"transformers {self.name}"

    # what a family names
    def model_class(self) -> Any:
        raise NotImplementedError

    def config_class(self) -> Any:
        raise NotImplementedError

    def check_config(self, config: dict, path: Path) -> None:
        """Refuse a checkpoint configuration this family's split does not support (BundleError)."""

    def visual_tokens(self, cfg: Any, where: Path | str) -> int:
        raise NotImplementedError

    def client_modules(self, model: Any) -> tuple[nn.Module, dict[str, Any]]:
        """(the vision tower, the connector's parts by state-dict prefix) of a loaded model."""
        raise NotImplementedError

    def random_client_modules(self, cfg: Any) -> tuple[nn.Module, dict[str, Any]]:
        """The same, with random weights at `cfg`'s shapes (under the caller's seed)."""
        raise NotImplementedError

    def rebuild(self, cfg: Any, meta: dict, vision_sd: dict, conn_sd: dict) -> tuple[nn.Module, nn.Module]:
        """(encoder, connector) as the NanoEdge runs them, from the client weights."""
        raise NotImplementedError

    def server_llm(self, model: Any, dtype: torch.dtype) -> ServerLLM:
        """The loaded model with its client parts dropped, as the server's LLM."""
        raise NotImplementedError

    def projector(self, model: Any) -> nn.Linear:
        """The connector's last linear layer, where an export folds NanoAdapter-I."""
        raise NotImplementedError

    # the shared behaviour
    def check(self, m: ModelConfig) -> None:
        super().check(m)
        if not m.checkpoint:
            raise ConfigError(f"model.checkpoint: backbone {self.name!r} needs the path of a local checkpoint")

    def check_source(self, m: ModelConfig) -> None:
        from fednano.backbones.bundle import check_checkpoint

        if not m.random_init:
            check_checkpoint(Path(m.checkpoint).expanduser(), self.model_type)

    def cache_key(self, cfg: RunConfig) -> dict:
        from fednano.backbones.bundle import SHIPPED_CONFIGS

        m = cfg.model
        if m.random_init:  # random weights at the shape of a config: a folder, or a shipped name
            return {"backbone": m.backbone, "random_init": m.checkpoint if m.checkpoint in SHIPPED_CONFIGS else absolute(m.checkpoint),
                    "seed": cfg.prepare.seed}
        return {"backbone": m.backbone, "checkpoint": absolute(m.checkpoint)}

    def prepare(self, cfg: RunConfig, tmp: Path) -> tuple[dict, dict]:
        from fednano.backbones.bundle import SHIPPED_CONFIGS, write_hf_mllm_bundle, write_random_hf_mllm_bundle

        m = cfg.model
        if m.random_init:
            source = m.checkpoint if m.checkpoint in SHIPPED_CONFIGS else absolute(m.checkpoint)
            meta = write_random_hf_mllm_bundle(tmp / "client", source, self.name, cfg.prepare.seed)
            server = {"kind": self.server_kind, "random_init": True, "config": meta["hf_config"], "seed": cfg.prepare.seed}
            return server, {"random_init": source, "num_visual_tokens": meta["num_visual_tokens"]}
        checkpoint = Path(absolute(m.checkpoint))
        meta = write_hf_mllm_bundle(tmp / "client", checkpoint, self.name)
        report = {"checkpoint": str(checkpoint), "num_visual_tokens": meta["num_visual_tokens"]}
        return {"kind": self.server_kind, "path": str(checkpoint)}, report

    def load_client(self, meta: dict, client_dir: Path, hidden: int) -> tuple[nn.Module, nn.Module, int]:
        from fednano.backbones.bundle import read_safetensors, require

        vision_sd = read_safetensors(require(client_dir / "vision.safetensors", "vision tower weights"))
        conn_sd = read_safetensors(require(client_dir / "connector.safetensors", "connector weights"))
        encoder, connector = self.rebuild(self.config_class().from_dict(meta["hf_config"]), meta, vision_sd, conn_sd)
        return encoder, connector, meta["num_visual_tokens"]

    def load_server(self, path: Path, dtype: torch.dtype, device: torch.device | str, device_map: str) -> ServerLLM:
        from fednano.backbones.bundle import load_hf_mllm

        return self.server_llm(load_hf_mllm(path, self.name, dtype, device, device_map)[0], dtype)

    def export(self, bundle: Path, source: Path, tuned: Tuning, out: Path, system: str) -> None:
        from fednano.export import export_hf_mllm

        export_hf_mllm(source, self, tuned, out)

    def load_export(self, path: Path, dtype: torch.dtype, device: torch.device) -> tuple[ClientBundle, ServerLLM]:
        """Split into its client and server parts like any checkpoint."""
        from fednano.backbones.bundle import load_nanoedge, load_server_llm
        from fednano.backbones.prepare import ensure_prepared
        from fednano.config import AdapterConfig, from_dict
        from fednano.export import EXPORT_INFO

        bundle = ensure_prepared(from_dict({"model": {"backbone": self.name, "checkpoint": str(path.resolve())}}, str(path / EXPORT_INFO)))
        return load_nanoedge(bundle / "client", AdapterConfig(), device), load_server_llm(bundle, dtype, device)

    def footprint_model(self, filename: str | None) -> tuple[Any, int, int, int]:
        from fednano.backbones.footprint import count, load_config_file

        if filename is None:
            return super().footprint_model(filename)
        cfg = self.config_class().from_dict(load_config_file(filename))
        m = self.model_class()(cfg)
        vision, connector = self.client_modules(m)
        connector_params = sum(count(p) if hasattr(p, "parameters") else p.numel() for p in connector.values())
        return m, count(vision), connector_params, self.visual_tokens(cfg, filename)


@dataclass(frozen=True)
class Llava(HFMLLM):
    """LlavaForConditionalGeneration (LLaVA-1.5 and friends): CLIP tower (one feature layer) + multi-modal projector."""

    model_type: ClassVar[str] = "llava"

    def model_class(self) -> Any:
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    def config_class(self) -> Any:
        from transformers import LlavaConfig

        return LlavaConfig

    def visual_tokens(self, cfg: Any, where: Path | str) -> int:
        from fednano.backbones.bundle import BundleError

        if not isinstance(cfg.vision_feature_layer, int) or cfg.vision_feature_select_strategy not in ("default", "full"):
            raise BundleError(f"{where}: only a single integer vision_feature_layer with 'default'/'full' selection is supported")
        return (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 + (cfg.vision_feature_select_strategy == "full")

    def client_modules(self, model: Any) -> tuple[nn.Module, dict[str, Any]]:
        return model.model.vision_tower, {"": model.model.multi_modal_projector}

    def random_client_modules(self, cfg: Any) -> tuple[nn.Module, dict[str, Any]]:
        from transformers import AutoModel
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        return AutoModel.from_config(cfg.vision_config), {"": LlavaMultiModalProjector(cfg)}

    def rebuild(self, cfg: Any, meta: dict, vision_sd: dict, conn_sd: dict) -> tuple[nn.Module, nn.Module]:
        from transformers import AutoModel
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        from fednano.client.hf_vision import HFVisionTower

        tower = AutoModel.from_config(cfg.vision_config)
        tower.load_state_dict(vision_sd)
        encoder = HFVisionTower(tower, meta["image_size"], meta["image_mean"], meta["image_std"], cfg.vision_feature_layer,
                                drop_cls=cfg.vision_feature_select_strategy == "default")
        projector = LlavaMultiModalProjector(cfg)
        projector.load_state_dict(conn_sd)
        return encoder, projector

    def server_llm(self, model: Any, dtype: torch.dtype) -> ServerLLM:
        from fednano.server.llm import ServerLLM

        model.model.vision_tower = model.model.multi_modal_projector = None
        return ServerLLM(model, dtype)

    def projector(self, model: Any) -> nn.Linear:
        return model.model.multi_modal_projector.linear_2


@dataclass(frozen=True)
class Blip2(HFMLLM):
    """Blip2ForConditionalGeneration with a decoder-only LM (the MiniGPT-4 / BLIP-2 design): ViT + Q-Former + projection."""

    model_type: ClassVar[str] = "blip-2"

    def model_class(self) -> Any:
        from transformers import Blip2ForConditionalGeneration

        return Blip2ForConditionalGeneration

    def config_class(self) -> Any:
        from transformers import Blip2Config

        return Blip2Config

    def check_config(self, config: dict, path: Path) -> None:
        from fednano.backbones.bundle import BundleError

        if not config.get("use_decoder_only_language_model", True):
            raise BundleError(f"{path}: BLIP-2 with an encoder-decoder LM (e.g. Flan-T5) is not supported; use a decoder-only LM")

    def visual_tokens(self, cfg: Any, where: Path | str) -> int:
        return int(cfg.num_query_tokens)

    def client_modules(self, model: Any) -> tuple[nn.Module, dict[str, Any]]:
        return model.vision_model, {"query_tokens": model.query_tokens, "qformer": model.qformer,
                                    "language_projection": model.language_projection}

    def random_client_modules(self, cfg: Any) -> tuple[nn.Module, dict[str, Any]]:
        import torch
        from torch import nn
        from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2VisionModel

        queries = torch.randn(1, cfg.num_query_tokens, cfg.qformer_config.hidden_size) * cfg.initializer_range
        return Blip2VisionModel(cfg.vision_config), {
            "query_tokens": queries,
            "qformer": Blip2QFormerModel(cfg.qformer_config),
            "language_projection": nn.Linear(cfg.qformer_config.hidden_size, cfg.get_text_config().hidden_size),
        }

    def rebuild(self, cfg: Any, meta: dict, vision_sd: dict, conn_sd: dict) -> tuple[nn.Module, nn.Module]:
        from torch import nn
        from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2VisionModel

        from fednano.client.hf_vision import HFVisionTower, QFormerConnector

        tower = Blip2VisionModel(cfg.vision_config)
        tower.load_state_dict(vision_sd)
        encoder = HFVisionTower(tower, meta["image_size"], meta["image_mean"], meta["image_std"], feature_layer=None, drop_cls=False)
        qformer = Blip2QFormerModel(cfg.qformer_config)
        qformer.load_state_dict({k[len("qformer.") :]: v for k, v in conn_sd.items() if k.startswith("qformer.")})
        proj = nn.Linear(cfg.qformer_config.hidden_size, cfg.text_config.hidden_size)
        proj.load_state_dict({k[len("language_projection.") :]: v for k, v in conn_sd.items() if k.startswith("language_projection.")})
        return encoder, QFormerConnector(nn.Parameter(conn_sd["query_tokens"]), qformer, proj)

    def server_llm(self, model: Any, dtype: torch.dtype) -> ServerLLM:
        from fednano.server.llm import ServerLLM

        model.vision_model = model.qformer = model.language_projection = model.query_tokens = None
        lm = model.language_model  # a whole causal LM (decoder + head)
        return ServerLLM(model, dtype, decoder=lm.get_decoder(), head=lm.get_output_embeddings())

    def projector(self, model: Any) -> nn.Linear:
        return model.language_projection


from fednano.backbones.idefics3 import Idefics3  # noqa: E402  (a family in its own file; it imports HFMLLM from here)

# One entry per backbone, in the order `fednano options` lists them.
BACKBONES: dict[str, Backbone] = {b.name: b for b in (
    Smol("smol"), Tiny("tiny"), Compose("compose"), Llava("llava"), Blip2("blip2"), Idefics3("idefics3"),
)}


def backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ConfigError(f"model.backbone: unknown backbone {name!r}; choose one of {list(BACKBONES)}") from None


def hf_family(name: str) -> HFMLLM:
    """The whole-MLLM backbone `name` (for the functions that take a family's name: bundle.load_hf_mllm, ...)."""
    b = backbone(name)
    if not isinstance(b, HFMLLM):
        raise ConfigError(f"backbone {name!r} is not a whole HF MLLM; choose one of "
                          f"{[n for n, e in BACKBONES.items() if isinstance(e, HFMLLM)]}")
    return b


def by_client_kind(kind: str) -> Backbone:
    """The entry that reads a client/ folder whose nanoedge.json says `kind`."""
    return next(b for b in BACKBONES.values() if b.client_kind == kind)


def by_server_kind(kind: str) -> Backbone:
    """The entry that loads the LLM a server.json (or an export's fednano_export.json) of `kind` names."""
    return next(b for b in BACKBONES.values() if b.server_kind == kind)
