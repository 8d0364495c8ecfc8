"""Run a FedNano experiment as a Flower simulation on this machine.

The ServerApp (with the LLM and the split server) runs in this process; each
client runs in a Ray actor process and reaches the LLM only through the split
channel. Each actor reserves `federation.client_cpus` CPUs and `client_gpus` of a
GPU (Ray hides the GPUs from an actor that reserves none, so its NanoEdge stays on
the CPU). Ray is shut down afterwards: nothing is left running.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

from flwr.clientapp import ClientApp

from fednano.config import ConfigError, RunConfig
from fednano.devices import gpus_visible, resolve_device

log = logging.getLogger("fednano")


def check_devices(cfg: RunConfig) -> None:
    """Device settings this machine cannot honour are refused before anything starts, with the field named."""
    resolve_device(cfg.model.server_device, "model.server_device")
    if cfg.federation.client_gpus > 0 and gpus_visible() == 0:
        raise ConfigError(f"federation.client_gpus={cfg.federation.client_gpus:g}: this machine has no CUDA GPU that torch can see; "
                          "set it to 0")
    if cfg.federation.client_gpus == 0 and cfg.model.client_device.startswith("cuda"):
        raise ConfigError(f"model.client_device={cfg.model.client_device!r}: simulated clients see no GPU unless "
                          "federation.client_gpus > 0")


def simulate(cfg: RunConfig, out_dir: Path, resume: bool = False, client_app: ClientApp | None = None) -> dict:
    """Run `cfg` in `out_dir` (resume: after its last completed round). `client_app` replaces
    FedNano's ClientApp (the tests wrap it to make a client fail)."""
    check_devices(cfg)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    # Keep Flower's state inside this run's folder, never in ~ (and stay offline).
    os.environ["FLWR_HOME"] = str(out_dir / ".flwr")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")

    import ray
    from flwr.simulation import run_simulation

    from fednano.federation.client_app import app
    from fednano.federation.server_app import build_server_app

    # Flower logs every message (and run_simulation's deprecation notice: we keep this
    # in-process runtime on purpose); FedNano logs its own per-round summary.
    logging.getLogger("flwr").setLevel(logging.ERROR)

    gpus = gpus_visible()
    backend: dict[str, dict[str, Any]] = {
        "client_resources": {"num_cpus": cfg.federation.client_cpus, "num_gpus": cfg.federation.client_gpus},
        "init_args": {
            "num_cpus": max(1, os.cpu_count() or 1),
            "num_gpus": gpus,
            "include_dashboard": False,
            "logging_level": "error",
            "log_to_driver": True,
        },
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # run_simulation's deprecation notice; we keep the in-process runtime on purpose
            run_simulation(
                build_server_app(cfg, out_dir, resume), client_app or app, num_supernodes=cfg.data.num_clients, backend_config=backend
            )
    finally:
        if ray.is_initialized():
            ray.shutdown()
    results = json.loads((out_dir / "results.json").read_text())
    if not results.get("final"):
        raise RuntimeError(f"the run did not finish; completed rounds are in {out_dir / 'results.json'}")
    return results
