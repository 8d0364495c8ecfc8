"""A real deployment on loopback: Flower SuperLink + SuperNodes as separate processes,
TLS and SuperNode authentication, the split channel over TLS with a token (~70 s)."""

import json
import subprocess

import pytest

from tests.conftest import ROOT


def test_tls_authenticated_federation(tmp_path):
    work = tmp_path / "federation"
    proc = subprocess.run(["bash", str(ROOT / "deploy" / "local-federation.sh"), str(work)], capture_output=True, text=True, timeout=600)
    logs = (
        "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((work / "logs").glob("*.log")))
        if (work / "logs").exists()
        else ""
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + logs
    assert "unregistered SuperNode refused" in proc.stdout
    res = json.loads((work / "out" / "results.json").read_text())
    assert res["final"] and all(r["clients_accepted"] == 2 for r in res["rounds"])
    assert res["rounds"][0]["bytes"]["activations_up"] > 0  # the split channel carried the steps
    # every message starts a fresh ClientApp process, which reports its start-up and hands the work to the node's warm
    # worker: one per node, which built the client runtime once and served every train and evaluate message
    for r in res["rounds"]:
        for p in [*r["client_phase_seconds"]["train"].values(), *r["client_phase_seconds"]["evaluate"].values()]:
            assert p["start"] > 0 and p["work"] > 0 and p["relay"] >= 0
    messages = len(res["rounds"]) * 2  # train and evaluate, each round (the zero-shot accuracy is the server's)
    for i in (0, 1):
        log = (work / f"node{i}" / "state" / "node-worker.log").read_text()
        assert log.count("listening on") == 1 and log.count("(built the client runtime)") == 1, log[-3000:]
        assert log.count(" message served in ") == messages, log[-3000:]
    # only the server prepared: each node's cache holds the client bundle it was sent (and its partition), no LLM file
    digest = res["bundle_digest"]
    for i in (0, 1):
        cache = work / f"node{i}" / "cache"
        assert sorted(p.name for p in cache.iterdir()) == ["nanoedge", "partitions"]
        assert [p.name for p in (cache / "nanoedge").iterdir()] == [digest]
        assert len(list((cache / "partitions").glob("*.json"))) == 1
        assert not [p for p in cache.rglob("*") if p.name in ("server.json", "model.safetensors", "prepare.json") or p.suffix == ".gguf"]
    assert f"sha256:{digest}" in (work / "logs" / "prepare.log").read_text()
    assert "(TLS), token required" in (work / "logs" / "flwr-run.log").read_text()
    assert "Failed to activate SuperNode" in (work / "logs" / "unregistered.log").read_text()
    left = subprocess.run(["pgrep", "-f", str(work)], capture_output=True, text=True).stdout.split()
    assert not left, f"processes left running: {left}"


def test_a_failed_server_app_fails_the_deployed_run_and_two_nodes_on_one_partition_are_refused(tmp_path):
    """`fednano deploy-run` follows the run and exits non-zero when the ServerApp fails (`flwr run` alone exits 0):
    here it fails because both SuperNodes claim partition-id 0, and the error names both nodes."""
    import os

    work = tmp_path / "federation"
    env = {**os.environ, "PARTITION_ID_1": "0", "ROUND_TIMEOUT": "60"}  # node 1 claims node 0's partition
    proc = subprocess.run(["bash", str(ROOT / "deploy" / "local-federation.sh"), str(work)], capture_output=True, text=True,
                          timeout=600, env=env)
    log = (work / "logs" / "flwr-run.log").read_text()
    assert proc.returncode != 0, proc.stdout[-2000:] + log[-2000:]
    assert "the run failed" in proc.stdout and "ended 'finished:failed'" in log, proc.stdout[-2000:] + log[-2000:]
    assert "both claim partition-id=0" in log, log[-3000:]
    assert not (work / "out" / "results.json").exists() or not json.loads((work / "out" / "results.json").read_text())["final"]
    assert not subprocess.run(["pgrep", "-f", str(work)], capture_output=True, text=True).stdout.split()


def test_hung_client_is_dropped_after_the_round_timeout(tmp_path):
    """One SuperNode's ClientApp hangs mid-round: the round goes on with the other."""
    import os

    from tests.conftest import TINY

    cfg = tmp_path / "one-round.toml"
    cfg.write_text(TINY.read_text().replace("rounds = 2", "rounds = 1"))
    work = tmp_path / "federation"
    env = {**os.environ, "FEDNANO_TEST_FAULT": "hang:1:1", "ROUND_TIMEOUT": "30", "CLIENTAPP": "tests.faulty_client:app"}
    proc = subprocess.run(
        ["bash", str(ROOT / "deploy" / "local-federation.sh"), str(work), str(cfg)], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (r,) = json.loads((work / "out" / "results.json").read_text())["rounds"]
    assert r["clients_sampled"] == 2 and r["clients_accepted"] == 1 and r["aggregated"]
    (drop,) = r["dropped"]
    assert drop["reason"] == "no reply within round_timeout=30 s"
    assert "dropped node" in (work / "logs" / "flwr-run.log").read_text()
    assert not subprocess.run(["pgrep", "-f", str(work)], capture_output=True, text=True).stdout.split()


def test_nodes_bring_their_own_data_and_a_malformed_one_is_named(tmp_path):
    """data.on_nodes over a real deployment: three SuperNodes, each with its own folder made here — LLaVA JSON,
    ScienceQA in its official layout, and a malformed LLaVA JSON. The round completes with the two good nodes;
    the bad one's error names its node and file; the server records what the good ones hold, in numbers. The
    server has no data of its own (data.server_test = false, its data section names a file that does not exist):
    the zero-shot and round accuracies are the nodes' evaluations on their own test splits, example-weighted."""
    import os

    from tests.conftest import TINY
    from tests.datasets import make_llava_json, make_scienceqa_official

    cfg = tmp_path / "one-round.toml"
    nowhere = tmp_path / "the-server-has-no-data.json"
    cfg.write_text(TINY.read_text().replace("rounds = 2", "rounds = 1").replace(
        "[data]\n", f'[data]\ndataset = "llava-json"\npath = "{nowhere}"\non_nodes = true\nserver_test = false\n'))
    llava, sqa = make_llava_json(tmp_path / "site-a", n=40), make_scienceqa_official(tmp_path / "site-b")
    bad = tmp_path / "site-c" / "data.json"
    bad.parent.mkdir()
    bad.write_text('[{"id": 1, "conversations": "not a list"}]')
    work = tmp_path / "federation"
    env = {**os.environ, "ON_NODES": "1", "NODE_CONFIG_0": f"dataset='llava-json' data-path='{llava}'",
           "NODE_CONFIG_1": f"dataset='scienceqa' data-path='{sqa}'", "NODE_CONFIG_2": f"dataset='llava-json' data-path='{bad}'"}
    proc = subprocess.run(["bash", str(ROOT / "deploy" / "local-federation.sh"), str(work), str(cfg), "3"],
                          capture_output=True, text=True, timeout=600, env=env)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((work / "logs").glob("*.log")))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + logs
    res = json.loads((work / "out" / "results.json").read_text())
    (r,) = res["rounds"]
    assert r["clients_sampled"] == 3 and r["clients_accepted"] == 2 and r["aggregated"]
    (rej,) = r["rejected"]
    assert "site-c/data.json" in rej["reason"] and "needs a 'conversations' list" in rej["reason"]
    assert set(res["node_data"]) == {"0", "1"}
    assert res["node_data"]["0"]["train"] + res["node_data"]["0"]["test"] == 40  # all of site-a's conversations, none partitioned away
    assert res["node_data"]["1"]["labels"] and res["config"]["data"]["on_nodes"] is True
    part = json.loads((work / "out" / "partition.json").read_text())
    assert [c["client"] for c in part["clients"]] == [0, 1]
    tests = {pid: d["test"] for pid, d in res["node_data"].items()}
    assert res["data"]["global_test"] == "clients" and not nowhere.exists()
    assert r["global_accuracy"] == pytest.approx(sum(r["client_accuracy"][p] * n for p, n in tests.items()) / sum(tests.values()))
    assert not subprocess.run(["pgrep", "-f", str(work)], capture_output=True, text=True).stdout.split()
