"""`fednano deploy-run`: start a run on a SuperLink with `flwr run`, follow it to its end, and return its verdict.

`flwr run` only submits a run and exits 0 even when the ServerApp then fails. This starts the run (`flwr run
--format json` gives its id), streams its log (`flwr log --stream`), polls its status (`flwr ls --run-id
--format json`) until it is finished, and succeeds only when Flower says `finished:completed` and the run's
results.json holds its final scores. Everything goes through Flower's own CLI, so the SuperLink connection
(`$FLWR_HOME/config.toml`, TLS, the account) is whatever `flwr run` would use.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fednano.errors import UserError
from fednano.federation import keys


class DeployError(UserError, RuntimeError):
    """The run could not be submitted or followed; the message says what Flower answered."""


@dataclass
class Outcome:
    run_id: int
    status: str  # Flower's, e.g. "finished:completed", "finished:failed"
    results: Path
    problem: str = ""  # why the run does not count as a success ("" when it does)

    @property
    def ok(self) -> bool:
        return not self.problem


def _flwr() -> str:
    here = Path(sys.executable).with_name("flwr")  # the flwr next to this Python (its venv), else the PATH's
    return str(here) if here.exists() else (shutil.which("flwr") or "flwr")


def _json_out(proc: subprocess.CompletedProcess, what: str) -> dict:
    """The JSON object a `flwr ... --format json` printed."""
    text = proc.stdout
    start = text.find("{")
    try:
        return json.JSONDecoder().raw_decode(text[start:])[0] if start >= 0 else {}
    except json.JSONDecodeError:
        raise DeployError(f"{what}: unreadable answer from flwr: {(text + proc.stderr).strip()[-400:]}") from None


def status(run_id: int, superlink: str | None = None) -> str:
    """Flower's status of a run (`flwr ls --run-id`): pending, starting, running, finished:completed|failed|stopped."""
    proc = subprocess.run([_flwr(), "ls", *([superlink] if superlink else []), "--run-id", str(run_id), "--format", "json"],
                          capture_output=True, text=True, timeout=120)
    runs = _json_out(proc, f"flwr ls --run-id {run_id}").get("runs") or []
    if not runs:
        raise DeployError(f"flwr ls --run-id {run_id}: no such run on the SuperLink ({(proc.stdout + proc.stderr).strip()[-300:]})")
    return str(runs[0].get("status", ""))


def verdict(run_id: int, flower_status: str, results: Path) -> Outcome:
    """Success: Flower finished the run as completed and results.json holds its final scores."""
    out = Outcome(run_id, flower_status, results)
    if flower_status != "finished:completed":
        out.problem = f"run {run_id} ended {flower_status!r} (its log: `flwr log {run_id} --show`)"
    elif not results.exists():
        out.problem = f"run {run_id} completed but wrote no {results}"
    elif not json.loads(results.read_text()).get("final"):
        out.problem = f"run {run_id} completed but {results} has no final scores"
    return out


def deploy_run(app_dir: Path, config_file: Path, output: Path, superlink: str | None = None, resume: bool = False,
               poll_s: float = 2.0, stream: bool = True) -> Outcome:
    """Submit the FedNano app in `app_dir` with `config_file`, writing to `output` (paths as the SuperLink's machine sees
    them), follow it until Flower says it is finished, and judge it (`verdict`)."""
    config_file, output = Path(config_file).resolve(), Path(output).resolve()
    if not config_file.is_file():
        raise DeployError(f"{config_file}: no such run config")
    run_config = f'{keys.CONFIG_FILE}="{config_file}" {keys.OUTPUT_DIR}="{output}"' + (" resume=true" if resume else "")
    cmd = [_flwr(), "run", str(app_dir), *([superlink] if superlink else []), "--run-config", run_config, "--format", "json"]
    env = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", **os.environ}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    started = _json_out(proc, "flwr run")
    if not started.get("success") or not started.get("run-id"):
        raise DeployError(f"flwr run did not start the run: {(proc.stdout + proc.stderr).strip()[-600:]}")
    run_id = int(started["run-id"])
    print(f"run {run_id} started on the SuperLink; following it", flush=True)
    log = (subprocess.Popen([_flwr(), "log", str(run_id), *([superlink] if superlink else []), "--stream"], env=env)
           if stream else None)
    try:
        while not (now := status(run_id, superlink)).startswith("finished"):
            time.sleep(poll_s)
        time.sleep(min(poll_s, 3.0) if log is not None else 0)  # the log's last lines
    finally:
        if log is not None:
            log.terminate()
            try:
                log.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.kill()
                log.wait()
    return verdict(run_id, now, output / "results.json")
