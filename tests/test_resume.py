"""No completed round is lost: SIGKILL the server mid-run, resume, and match an uninterrupted run."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from tests.conftest import ROOT, TINY

ARGS = ["--set", "federation.rounds=3", "--set", "train.local_steps=40"]


def _env(tiny_cache):
    return {**os.environ, "FEDNANO_CACHE": str(tiny_cache), "FEDNANO_PROGRESS": "off"}


def _cli(*args):
    return [sys.executable, "-m", "fednano", "run", *args]


def _rounds(path):
    try:
        return len(json.loads(path.read_text())["rounds"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _kill_session(sid: int) -> None:
    """SIGKILL every process of the run's session (the server and the Ray processes it started)."""
    out = subprocess.run(["pgrep", "-s", str(sid)], capture_output=True, text=True)
    for pid in map(int, out.stdout.split()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("method", ["fednano", "fedadam", "local"])  # stateless; server-optimiser moments; per-client adapters
def test_sigkill_then_resume_matches_uninterrupted_run(tiny_bundle, tiny_cache, tmp_path, method):
    env = _env(tiny_cache)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    args = [*ARGS, "--set", f"federation.strategy='{method}'"]
    ref = subprocess.run(
        _cli("--config", str(TINY), "--output", str(ref_dir), *args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert ref.returncode == 0, ref.stderr[-2000:]

    proc = subprocess.Popen(
        _cli("--config", str(TINY), "--output", str(run_dir), *args),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        while _rounds(run_dir / "results.json") < 1:
            assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before round 1"
            time.sleep(0.05)
    finally:
        _kill_session(proc.pid)  # SIGKILL, mid-round 2
        proc.wait()
    killed_at = _rounds(run_dir / "results.json")
    assert 1 <= killed_at < 3, "the run finished before it could be killed"
    before = json.loads((run_dir / "results.json").read_text())
    assert not before["final"]

    res = subprocess.run(_cli("--resume", str(run_dir)), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    after = json.loads((run_dir / "results.json").read_text())
    reference = json.loads((ref_dir / "results.json").read_text())
    assert [r["round"] for r in after["rounds"]] == [1, 2, 3]
    assert after["rounds"][:killed_at] == before["rounds"]  # completed rounds kept as they were
    assert [r["global_accuracy"] for r in after["rounds"]] == [r["global_accuracy"] for r in reference["rounds"]]
    assert [r["client_accuracy"] for r in after["rounds"]] == [r["client_accuracy"] for r in reference["rounds"]]
    assert after["final"]["global_accuracy"] == reference["final"]["global_accuracy"]
    a, b = load_file(run_dir / "adapters.safetensors"), load_file(ref_dir / "adapters.safetensors")
    for k in b:
        assert (a[k] - b[k]).abs().max() < 1e-6


def test_resume_refuses_extra_options_and_unknown_folders(tmp_path):
    out = subprocess.run(_cli("--resume", str(tmp_path), "--config", str(TINY)), cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "--resume uses the run's own config.toml" in out.stderr
    out = subprocess.run(_cli("--resume", str(tmp_path)), cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "not a FedNano results folder" in out.stderr


@pytest.mark.parametrize("finished", [True])
def test_resuming_a_finished_run_changes_nothing(tiny_bundle, tiny_cache, tmp_path, finished):
    env = _env(tiny_cache)
    out_dir = tmp_path / "run"
    first = subprocess.run(
        _cli("--config", str(TINY), "--output", str(out_dir), "--set", "federation.rounds=1"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert first.returncode == 0, first.stderr[-2000:]
    text = (out_dir / "results.json").read_text()
    again = subprocess.run(_cli("--resume", str(out_dir)), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and (out_dir / "results.json").read_text() == text
