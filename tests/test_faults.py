"""A federation survives what real ones do to it: a client that dies or hangs mid-round."""

import json
import os
import subprocess
import sys

from tests.conftest import ROOT, TINY

DRIVER = """
import json, sys
from fednano.config import load_config
from fednano.federation.simulation import simulate
from tests.faulty_client import app
simulate(load_config(sys.argv[1], json.loads(sys.argv[3])), sys.argv[2], client_app=app)
"""


def _run(tiny_cache, out, fault, *sets):
    """A simulation whose ClientApp is the tests' faulty one (Ray's actors import it: PYTHONPATH)."""
    env = {**os.environ, "FEDNANO_CACHE": str(tiny_cache), "FEDNANO_PROGRESS": "off", "FEDNANO_TEST_FAULT": fault, "PYTHONPATH": str(ROOT)}
    overrides = {"data.num_clients": 3, "federation.client_cpus": 0.5, "data.min_partition_size": 5}
    for s in sets:
        key, _, value = s.partition("=")
        overrides[key] = json.loads(value)
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(TINY), str(out), json.dumps(overrides)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), proc.stdout + proc.stderr


def test_client_dies_mid_round(tiny_bundle, tiny_cache, tmp_path):
    res, log = _run(tiny_cache, tmp_path / "run", "exit:1:1", "federation.rounds=2")
    r1, r2 = res["rounds"]
    assert r1["clients_sampled"] == 3 and r1["clients_accepted"] == 2 and r1["aggregated"]
    (rej,) = r1["rejected"]
    assert "client error" in rej["reason"] and "died" in rej["reason"]
    assert r2["aggregated"] and r2["clients_accepted"] >= 2  # the federation goes on
    assert "rejected update from node" in log
