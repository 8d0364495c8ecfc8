"""A real deployment on loopback: Flower SuperLink + SuperNodes as separate processes,
TLS and SuperNode authentication, the split channel over TLS with a token (~70 s)."""

import json
import subprocess

from tests.conftest import ROOT


def test_tls_authenticated_federation(tmp_path):
    work = tmp_path / "federation"
    proc = subprocess.run(["bash", str(ROOT / "deploy" / "local-federation.sh"), str(work)], capture_output=True, text=True, timeout=600)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((work / "logs").glob("*.log"))) if (work / "logs").exists() else ""
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + logs
    assert "unregistered SuperNode refused" in proc.stdout
    res = json.loads((work / "out" / "results.json").read_text())
    assert res["final"] and all(r["clients_accepted"] == 2 for r in res["rounds"])
    assert res["rounds"][0]["bytes"]["activations_up"] > 0  # the split channel carried the steps
    assert "(TLS), token required" in (work / "logs" / "flwr-run.log").read_text()
    assert "Failed to activate SuperNode" in (work / "logs" / "unregistered.log").read_text()
    left = subprocess.run(["pgrep", "-f", str(work)], capture_output=True, text=True).stdout.split()
    assert not left, f"processes left running: {left}"
