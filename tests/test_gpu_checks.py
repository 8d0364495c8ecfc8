"""benchmarks/gpu_checks.py: what it reads from pytest, what it calls a finished run, and (as `make gpu-rehearsal`,
from .ci/run) the whole script on this CPU with toy shapes and only the GPU machine's packages."""

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("gpu_checks", ROOT / "benchmarks" / "gpu_checks.py")
assert SPEC is not None and SPEC.loader is not None
gpu_checks = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(gpu_checks)

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="1" failures="1" skipped="3" tests="6">
<testcase classname="tests.test_frames" name="test_round_trip_every_dtype[cuda-float32]" time="0.1"/>
<testcase classname="tests.test_frames" name="test_scaled[cuda]" time="0.1"><failure message="assert 1 == 2">boom</failure></testcase>
<testcase classname="tests.test_micro_batching" name="test_batched[cuda]" time="0"><skipped message="no CUDA GPU">x</skipped></testcase>
<testcase classname="tests.test_privacy" name="test_noise[cuda]" time="0"><skipped message="no CUDA GPU">x</skipped></testcase>
<testcase classname="" name="tests.test_strategy" time="0"><skipped message="collection skipped">('/r/tests/test_strategy.py', 9,
'Skipped: the federation layer needs Flower')</skipped></testcase>
<testcase classname="" name="tests.test_private_noise" time="0"><error message="collection failure">ImportError while importing
E   ModuleNotFoundError: No module named 'scipy'</error></testcase>
</testsuite></testsuites>"""


def test_junit_counts_separate_failures_skips_and_modules_that_do_not_import():
    counts = gpu_checks.junit_counts(JUNIT)

    assert (counts["passed"], counts["failed"], counts["skipped"]) == (1, 1, 3)
    assert counts["failed_tests"] == ["tests.test_frames::test_scaled[cuda]"]
    assert counts["skip_reasons"] == {"no CUDA GPU": 2, "tests.test_strategy: the federation layer needs Flower": 1}
    assert counts["not_importable"] == {"tests.test_private_noise": "E   ModuleNotFoundError: No module named 'scipy'"}


def test_a_run_is_complete_only_with_every_check_present_and_ok(tmp_path):
    assert gpu_checks.missing(tmp_path) == [f"{tmp_path / 'results.json'} was not written"]
    checks = {name: {"status": "ok"} for name in gpu_checks.BUDGETS}
    checks["round"] = {"status": "timed out", "error": "killed after its budget of 90 s"}
    del checks["server-step"]
    (tmp_path / "results.json").write_text(json.dumps({"checks": checks}))
    for name in checks:
        (tmp_path / f"{name}.json").write_text("{}")
    (tmp_path / "gpu-tests.json").unlink()

    assert gpu_checks.missing(tmp_path) == ["server-step: not in results.json", "gpu-tests: no gpu-tests.json",
                                            "round: timed out: killed after its budget of 90 s"]


def test_budgets_default_within_eight_minutes_and_are_overridden_by_name():
    assert sum(gpu_checks.BUDGETS.values()) <= 8 * 60 - 15  # the GPU run ends within 8 minutes, start-up included
    assert gpu_checks.parse_budgets(["round=12.5"])["round"] == 12.5
    with pytest.raises(SystemExit, match="NAME=SECONDS"):
        gpu_checks.parse_budgets(["rounds=3"])


REHEARSAL = os.environ.get("GPU_REHEARSAL_PYTHON", "")


@pytest.mark.timeout(1800)
@pytest.mark.skipif(not REHEARSAL, reason="about 6 minutes with its venv: `make gpu-rehearsal` runs it (.ci/run), not `make test`")
def test_every_gpu_check_runs_on_the_cpu_with_only_the_gpu_machines_packages(tmp_path):
    out = tmp_path / "out"
    budgets = [a for name in gpu_checks.BUDGETS for a in ("--budget", f"{name}=300")]  # a shared CPU is slower than the H200's budgets
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # as on the GPU machine: the tree on the path, nothing installed
    for package in ("flwr", "ray", "datasets", "easy_vqa", "gguf", "fednano"):  # what the GPU machine does not have
        probe = subprocess.run([REHEARSAL, "-c", f"import {package}"], capture_output=True, cwd=tmp_path, env={**env, "PYTHONPATH": ""})
        assert probe.returncode != 0, f"the rehearsal's venv has {package}, which the GPU machine lacks"

    proc = subprocess.run([REHEARSAL, str(ROOT / "benchmarks" / "gpu_checks.py"), "--device", "cpu", "--tiny", "--out", str(out), *budgets],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=1700)

    assert gpu_checks.missing(out) == [], proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0
    checks = json.loads((out / "results.json").read_text())["checks"]
    assert checks["gpu-tests"]["counts"]["skipped"] > 0 and not checks["gpu-tests"]["counts"]["failed"]  # no CUDA here: every case skips
    assert [r["compiled"] for r in checks["server-step"]["rows"] if "seconds" in r] == [False, True, False]
    assert [r["clients"] for r in checks["split-throughput"]["rows"]] == [1, 8, 32, 64]
    assert [r["kind"] for r in checks["client-memory"]["rows"]] == ["fednano", "fedit-lora"]
    rnd = checks["round"]
    assert set(rnd["train"]["clients"]) == {"0", "1"} and rnd["bytes"]["fisher_up"] > 0 and rnd["bytes"]["eval_activations_up"] > 0
    assert "accuracy" in rnd["server_evaluation"] and (out / "results.md").read_text().count("## ") >= 5
