"""A real deployment on loopback: Flower SuperLink + SuperNodes as separate processes,
TLS and SuperNode authentication, the split channel over TLS with a token (~70 s)."""

import json
import subprocess

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
    assert "(TLS), token required" in (work / "logs" / "flwr-run.log").read_text()
    assert "Failed to activate SuperNode" in (work / "logs" / "unregistered.log").read_text()
    left = subprocess.run(["pgrep", "-f", str(work)], capture_output=True, text=True).stdout.split()
    assert not left, f"processes left running: {left}"


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
