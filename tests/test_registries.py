"""Methods, backbones, split protocols and datasets are registry objects: config.py takes their names and checks from
the registries, and no code outside a registry chooses behaviour by comparing their names."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from fednano.backbones.registry import BACKBONES, HFMLLM, Composed, by_client_kind, by_server_kind, hf_family
from fednano.config import DATASETS, SPLIT_PROTOCOLS, ConfigError, ModelConfig, RunConfig, from_dict
from fednano.data import DATASETS as DATASET_REGISTRY
from fednano.methods.registry import METHODS
from fednano.split.protocols import PROTOCOLS

PACKAGE = Path(__file__).resolve().parents[1] / "fednano"
REGISTRIES = {PACKAGE / "backbones" / "registry.py", PACKAGE / "split" / "protocols.py", PACKAGE / "data" / "__init__.py",
              PACKAGE / "methods" / "registry.py"}


def test_config_takes_its_names_from_the_registries():
    assert tuple(DATASETS) == tuple(DATASET_REGISTRY)
    assert tuple(PROTOCOLS) == SPLIT_PROTOCOLS
    with pytest.raises(ConfigError, match=r"model.backbone: unknown backbone 'nope'; choose one of \['smol', 'tiny', 'compose'"):
        ModelConfig(backbone="nope")
    with pytest.raises(ConfigError, match=r"federation.strategy: unknown strategy 'nope'; choose one of \['centralized', 'fedadam'"):
        from_dict({"federation": {"strategy": "nope"}})


def test_config_asks_the_method_for_its_checks():
    # Each error comes from Method.check (methods/registry.py), called when the config is built, not when it runs
    with pytest.raises(ConfigError, match="data.on_nodes: 'centralized' trains on every client's data on the server"):
        from_dict({"data": {"on_nodes": True}, "federation": {"strategy": "centralized"}})
    with pytest.raises(ConfigError, match="federation.merge_diagnostics: 'local' has no global merge"):
        from_dict({"federation": {"strategy": "local", "merge_diagnostics": True}})
    assert from_dict({"federation": {"strategy": "fednano", "merge_diagnostics": True}}).federation.merge_diagnostics


def test_importing_config_pulls_in_neither_torch_nor_flower():
    # Prepare: a fresh interpreter (this one has imported everything already)
    code = "import sys, fednano.config; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'flwr', 'transformers')))"
    # Execute
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # Assert
    assert out.strip() == "[]"


@pytest.mark.parametrize(("backbone", "settings", "field"), [
    ("compose", {}, "model.llm_path: backbone 'compose' needs the path of a local causal LM"),
    ("llava", {}, "model.checkpoint: backbone 'llava' needs the path of a local checkpoint"),
    ("blip2", {}, "model.checkpoint: backbone 'blip2' needs the path of a local checkpoint"),
    ("smol", {"random_init": True}, "model.random_init: only for the llava, blip2 and idefics3 backbones"),
    ("tiny", {"random_init": True}, "model.random_init: only for the llava, blip2 and idefics3 backbones"),
])
def test_each_backbone_refuses_the_settings_it_cannot_honour(backbone, settings, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig(backbone=backbone, **settings)


def test_every_bundle_layout_is_read_by_the_entry_that_writes_it():
    for b in BACKBONES.values():
        reader = by_client_kind(b.client_kind)
        assert reader.client_kind == b.client_kind and by_server_kind(b.server_kind).server_kind == b.server_kind
        assert isinstance(reader, Composed) == isinstance(b, Composed)  # (smol, tiny and compose share one layout)
    assert {n for n, b in BACKBONES.items() if isinstance(b, HFMLLM)} == {"llava", "blip2", "idefics3"}
    assert hf_family("llava").model_type == "llava" and hf_family("blip2").model_type == "blip-2"
    with pytest.raises(ConfigError, match="not a whole HF MLLM"):
        hf_family("smol")


@pytest.mark.parametrize(("settings", "message"), [
    ({"split": {"protocol": "cached-features", "label_private": True}}, "split.label_private: the U-shaped split"),
    ({"split": {"protocol": "cached-features+ids"}, "privacy": {"embedding_noise": 1.0}}, "privacy.embedding_noise:"),
    ({"split": {"protocol": "cached-features"}, "adapter": {"dropout": 0.1}}, "split.protocol: 'cached-features' needs adapter.dropout"),
    ({"split": {"protocol": "activations"}, "privacy": {"dp_sgd": True}, "adapter": {"dropout": 0.1}},
     "privacy.dp_sgd: per-sample gradients need"),
])
def test_each_protocol_refuses_the_settings_it_cannot_honour(settings, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(settings)
    assert PROTOCOLS["activations"].sends_embeddings and not PROTOCOLS["cached-features"].sends_embeddings
    assert isinstance(RunConfig(), RunConfig)


def _name_comparisons(path: Path, names: set[str]) -> list[str]:
    """`x == 'llava'`, `x in ('llava', 'blip2')`, ... in one file: a comparison with a registered name as a literal."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        for side in [node.left, *node.comparators]:
            literals = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
            if any(isinstance(v, ast.Constant) and v.value in names for v in literals):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return found


def test_no_code_outside_the_registries_compares_method_backbone_protocol_or_dataset_names():
    names = set(METHODS) | set(BACKBONES) | set(PROTOCOLS) | set(DATASET_REGISTRY) | {"causal-lm", "blip-2"}
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) if path not in REGISTRIES for hit in _name_comparisons(path, names)]
    assert found == []
