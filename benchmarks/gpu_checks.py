"""Every GPU measurement FedNano still owes (BENCHMARKS.md, "FedNano on GPUs"), in one command that ends within
8 minutes on one H200 and writes its tables (results.md) and raw numbers (results.json) under --out:

    gpu-tests         the `gpu` pytest cases (`pytest -m gpu` in a subprocess): passed / failed / skipped, with reasons
    server-step       a 7B server step (ServerLLM.train_steps) at 8 x 640 (LLaVA-1.5-7B) and 8 x 96 (MiniGPT-4), random
                      weights, bf16, eager and under torch.compile (model.compile), against the bf16 matmul rate measured
                      in the same run (goal >= 0.50)
    split-throughput  the split server (micro-batched by tokens) at the SmolLM2-135M shape, random weights, with 1, 8, 32
                      and 64 concurrent clients as threads in this process (goal >= 10x one client's samples/s at 32)
    client-memory     peak memory and step time of a 7B NanoEdge client (split, against a 7B split server) vs a whole-LLM
                      LoRA client (fedit-lora), each in its own process (goal >= 25x less memory)
    round             one paper-scale round of `fednano` (2 clients, a few steps, Fisher, merging, evaluation) through the
                      real split channel, without Flower: the server in one process, the clients as threads in another;
                      time, memory per side, bytes

    PYTHONPATH=. python3 benchmarks/gpu_checks.py --out /tmp/gpu-checks                   # on the GPU machine
    PYTHONPATH=. python3 benchmarks/gpu_checks.py --device cpu --tiny --out /tmp/rehearse  # the rehearsal (make gpu-rehearsal)

Each check runs in its own process group with its own time budget (--budget NAME=SECONDS): one that fails records its
error, one that overruns is killed and keeps what it measured up to then (every check rewrites its JSON after each
measurement), and the others still run. The exit status is 1 when any check failed or timed out, after everything is
written. A goal not met is a finding, not a failure. --tiny swaps every shape for a toy one built by the same code
(TINY_LLAVA in common.py), so that the whole path can be rehearsed on a CPU with only the GPU machine's packages.

Only what the GPU machine has is imported (torch, transformers, accelerate, peft, grpcio, ...: no Flower, Ray, datasets or
easy-vqa): the round runs FedNano's own client and server code without the Flower layer, and the data is a LLaVA-JSON set
drawn here (common.draw_llava_json). The tiny-bundle `gpu` test cases need easy-vqa's images; to run them there, carry
`.venv/lib/python3.11/site-packages/easy_vqa` (22 MiB, pure Python) and pass `--extra-path .venv/lib/python3.11/site-packages`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# check -> default time budget in seconds; in this order. The sum (465 s) leaves the run inside 8 minutes.
BUDGETS = {"gpu-tests": 70.0, "server-step": 165.0, "split-throughput": 65.0, "client-memory": 80.0, "round": 85.0}
CLIENTS = 2  # clients in the round


# ------------------------------------------------------------------ results: one JSON per check, rewritten as it goes
class Record:
    """A check's results, rewritten to its JSON file after every measurement: a check killed at its budget keeps
    what it had measured."""

    def __init__(self, path: Path) -> None:
        self.path, self.data = path, {}

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        write_json(self.path, self.data)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


# ------------------------------------------------------------------ devices and memory
def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    """Start a new peak: CUDA's allocator statistics, or on a CPU the process's high-water mark (Linux clear_refs)."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")


def _proc_status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def memory_now(device) -> int:
    """Bytes this process holds now: allocated on the GPU, or resident on the host (CPU)."""
    import torch

    return int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else _proc_status("VmRSS")


def memory_peak(device) -> int:
    """Peak bytes since reset_peak: allocated on the GPU, or the host's resident high-water mark (CPU)."""
    import torch

    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else _proc_status("VmHWM")


def memory_kind(device) -> str:
    return "GPU memory allocated (torch)" if device.type == "cuda" else "host resident memory (no GPU: the rehearsal)"


def free(device) -> None:
    """Give back what a dropped model held: torch.compile's caches keep references to the modules they traced."""
    import torch

    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_left(args: argparse.Namespace) -> float:
    return args.deadline - time.time()


# ------------------------------------------------------------------ a: the gpu test cases
def junit_counts(xml_text: str) -> dict:
    """pytest's JUnit XML -> passed / failed / skipped counts, the names that failed and why each skip happened."""
    counts: dict = {"passed": 0, "failed": 0, "skipped": 0, "failed_tests": [], "skip_reasons": {}, "not_importable": {}}
    for case in ET.fromstring(xml_text).iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        error = case.find("error")
        if not case.get("classname") and error is not None:  # a module that failed to import: its cases, gpu ones too, are unknown
            lines = (error.text or error.get("message") or "").strip().splitlines()
            counts["not_importable"][case.get("name", "")] = next((x for x in reversed(lines) if x.startswith("E ")), lines[-1:] or "")
        elif case.find("failure") is not None or error is not None:
            counts["failed"] += 1
            counts["failed_tests"].append(name)
        elif (skip := case.find("skipped")) is not None:
            counts["skipped"] += 1
            reason = skip.get("message") or ""
            if reason == "collection skipped":  # a whole module (pytest.importorskip): the reason is in the text, after "Skipped: "
                reason = f"{case.get('name')}: " + (skip.text or "").partition("Skipped: ")[2].rstrip("')\"")
            reason = reason.removeprefix("Skipped: ")
            counts["skip_reasons"][reason] = counts["skip_reasons"].get(reason, 0) + 1
        else:
            counts["passed"] += 1
    return counts


def check_gpu_tests(args: argparse.Namespace, rec: Record) -> None:
    xml = args.out / "gpu-tests.xml"
    import importlib.util

    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", "--continue-on-collection-errors",
           f"--junitxml={xml}", "tests"]
    if importlib.util.find_spec("pytest_timeout") is None:  # pyproject's addopts ask for it; the check's budget bounds time instead
        cmd[3:3] = ["-o", "addopts=-ra"]
    rec["command"] = " ".join(cmd[1:])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *args.extra_path, os.environ.get("PYTHONPATH", "")]),
           "FEDNANO_CACHE": str(args.out / "cache" / "tests")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(10.0, time_left(args) - 5))
    (args.out / "gpu-tests.log").write_text(proc.stdout + proc.stderr)
    rec["exit_code"] = proc.returncode
    if not xml.exists():
        raise RuntimeError(f"pytest wrote no report (exit {proc.returncode}): {proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    rec["counts"] = junit_counts(xml.read_text())
    c = rec["counts"]
    if proc.returncode not in (0, 5) or c["failed"] or c["not_importable"]:  # 5: no test selected
        raise RuntimeError(f"pytest -m gpu exited {proc.returncode}: {c['failed']} failed {c['failed_tests']}; test modules that do not "
                           f"import here (their gpu cases cannot run; skip them with a reason): {c['not_importable']}")


# ------------------------------------------------------------------ b: the 7B server step
def check_server_step(args: argparse.Namespace, rec: Record) -> None:
    import torch
    from common import count_flops, matmul_gflops, random_llm, random_request, server_step_cost

    device = torch.device(args.device)
    rec["machine"] = machine_of(device)
    peak = matmul_gflops(torch.bfloat16, device)
    rec["matmul_gflops_bf16"] = peak
    # (label, LLM shape, batch, visual tokens, text tokens)
    rows = [("LLaVA-1.5-7B", "llava-1.5-7b", 8, 576, 64), ("MiniGPT-4", "minigpt4", 8, 32, 64)]
    if args.tiny:
        rows = [("LLaVA-1.5-7B, toy", "tiny-llava", 2, 4, 60), ("MiniGPT-4, toy", "tiny-llava", 2, 4, 12)]
    repeats = 2 if args.tiny else 5
    results, compile_s = [], None
    for label, shape, batch, visual, text in rows:
        t0 = time.perf_counter()
        llm = random_llm(shape, device)
        built = time.perf_counter() - t0
        req = random_request(llm, batch, visual + text)
        flops = count_flops(lambda llm=llm, req=req: llm.train_steps([req]))  # eager ops: the same maths compiled
        for compiled in (False, True):
            row = {"model": label, "shape": shape, "compiled": compiled, "build_s": built,
                   "parameters": sum(p.numel() for p in llm.model.parameters())}
            if compiled and args.tiny and compile_s is not None:  # a CPU compiles for a minute; the path is rehearsed once
                results.append({**row, "skipped": "toy shapes: compiled for the first shape only"})
                rec["rows"] = results
                continue
            if compiled:
                need = 1.5 * compile_s if compile_s else (30.0 if args.tiny else 100.0)
                if time_left(args) < need:
                    results.append({**row, "skipped": f"{time_left(args):.0f} s of the check's budget left, compiling needs ~{need:.0f} s"})
                    rec["rows"] = results
                    continue
                llm.compile_training()  # what model.compile = true does
                t0 = time.perf_counter()
                llm.train_steps([req])
                sync(device)
                row["compile_s"] = compile_s = time.perf_counter() - t0
            row.update(server_step_cost(llm, batch, visual, text, 4, repeats, device, peak, flops=flops))
            results.append(row)
            rec["rows"] = results
        del llm, req
        free(device)
    done = [r for r in results if "fraction_of_matmul" in r and r["shape"] == rows[0][1]]
    rec["goal"] = f"achieved / bf16 matmul rate >= 0.50 at {rows[0][2]} x {rows[0][3] + rows[0][4]}"
    rec["best_fraction"] = max((r["fraction_of_matmul"] for r in done), default=None)
    rec["goal_met"] = rec["best_fraction"] is not None and rec["best_fraction"] >= 0.5


# ------------------------------------------------------------------ c: split-server throughput
def check_split_throughput(args: argparse.Namespace, rec: Record) -> None:
    import torch
    from common import random_llm, random_request
    from concurrency import run

    device = torch.device(args.device)
    rec["machine"] = machine_of(device)
    shape = "tiny-llava" if args.tiny else "smol"
    llm = random_llm(shape, device)
    request = random_request(llm, 8, 45)  # 8 samples x (9 visual + 36 text) tokens, as an easy-vqa step
    steps, max_tokens = (2 if args.tiny else 4), 32768
    rec["setup"] = {"llm": shape, "batch": 8, "tokens": 45, "steps_per_client": steps, "max_batch_tokens": max_tokens}
    rows = []
    for n in (1, 8, 32, 64):
        rate, passes = run(llm, True, n, steps, request, max_tokens)
        rows.append({"clients": n, "samples_per_s": rate, "llm_passes": passes, "steps": n * steps})
        rec["rows"] = rows
    if time_left(args) > 20:  # the same 32 clients without micro-batching: what merging the steps buys
        rate, passes = run(llm, False, 32, steps, request, max_tokens)
        rec["unbatched_32"] = {"samples_per_s": rate, "llm_passes": passes}
    one = rows[0]["samples_per_s"]
    rec["speedup_32"] = next(r["samples_per_s"] for r in rows if r["clients"] == 32) / one
    rec["goal"] = ">= 10x one client's samples/s at 32 clients"
    rec["goal_met"] = rec["speedup_32"] >= 10


# ------------------------------------------------------------------ d and e: a 7B MLLM's clients and round
def run_config(args: argparse.Namespace) -> Any:
    """The paper-scale dry run's settings (configs/dryrun-7b.toml: LLaVA-1.5-7B's architecture, random weights, rank-64
    NanoAdapters, batch 8) on `--device`, with a LLaVA-JSON set drawn here and every cache under --out; --tiny: the
    toy LLaVA (TINY_LLAVA) and smaller batches."""
    from common import TINY_LLAVA, draw_llava_json

    from fednano.config import load_config

    data = args.out / "data"
    path = data / "shapes.json" if (data / "shapes_test.json").exists() else draw_llava_json(data, 48, 16)
    sets: dict[str, Any] = {
        "model.cache_dir": str(args.out / "cache"), "model.server_device": args.device, "model.client_device": args.device,
        "model.checkpoint": str(model_folder(args.out / ("tiny-llava" if args.tiny else "llava-1.5-7b"), TINY_LLAVA if args.tiny else None,
                                             path)),
        "federation.client_gpus": 0.0, "data.dataset": "llava-json", "data.path": str(path), "data.num_clients": CLIENTS,
    }
    if args.tiny:
        sets.update({"adapter.rank": 4, "adapter.alpha": 8.0, "train.batch_size": 2,
                     "train.fisher_samples": 2, "train.eval_batch_size": 4, "train.local_steps": 2})
    return load_config(ROOT / "configs" / "dryrun-7b.toml", sets)


def model_folder(folder: Path, config: dict | None, data_path: Path) -> Path:
    """model.checkpoint for a random-weight LLaVA: its configuration (`config`, or the shipped LLaVA-1.5-7B one) beside a
    word-level tokenizer over the words of the drawn data and of the prompt. A folder's own tokenizer is what
    bundle.random_mllm_config takes first; its default one is built from easy-vqa's words, absent on the GPU machine."""
    import re
    import shutil

    from fednano.backbones.footprint import load_config_file
    from fednano.backbones.tiny import tiny_tokenizer
    from fednano.data.llava_json import SYSTEM

    if (folder / "tokenizer_config.json").exists():  # made once: the check's child processes read it
        return folder
    text = " ".join(turn["value"] for split in ("train", "test")
                    for record in json.loads(data_path.with_name(f"{data_path.stem}_{split}.json").read_text())
                    for turn in record["conversations"])
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_json(tmp / "config.json", config or load_config_file("llava-1.5-7b.json"))
    words = re.findall(r"\w+|[^\w\s]+", f"{SYSTEM} USER: ASSISTANT: {text}".lower())
    tiny_tokenizer(chat_template=False, extra_specials=("<image>",), words=words).save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def client_data(task: Any, partition: int, clients: int, max_test: int) -> Any:
    """Client `partition`'s share: every `clients`-th training sample, and as many test samples (at most max_test).
    (The runs' Dirichlet partitioner lives in Flower's datasets package, which the GPU machine lacks.)"""
    from fednano.data.partition import ClientData

    return ClientData(task.train[partition::clients], task.test[partition::clients][:max_test])


def client_runtime(cfg: Any, address: str, token: str = "") -> Any:
    """What a client process holds (runtime.client.ClientRuntime): its NanoEdge from the prepared bundle's client part
    (read from the cache this script prepared, instead of fetched over the channel), its batches and the split channel."""
    import torch

    from fednano.backbones.bundle import load_nanoedge
    from fednano.backbones.prepare import bundle_dir
    from fednano.client.features import ImageFeatures, Workload
    from fednano.data import load_task
    from fednano.runtime.client import ClientRuntime
    from fednano.split.client import SplitClient

    device = torch.device(cfg.model.client_device)
    bundle = load_nanoedge(bundle_dir(cfg) / "client", cfg.adapter, device)
    task = load_task(cfg)
    work = Workload(bundle.tokenizer, ImageFeatures(bundle.edge.vision), bundle.edge.num_visual_tokens, task.system)
    split = SplitClient(address, cfg.split.wire_dtype, cfg.split.max_frame_mb, cfg.federation.round_timeout, token=token or None,
                        protocol=cfg.split.protocol)
    return ClientRuntime(cfg, bundle.edge, work, split, device, task)


def child(args: argparse.Namespace, *extra: str, timeout: float) -> dict:
    """Run this script's `extra` mode in a fresh process (its own GPU memory statistics); -> the JSON it printed last."""
    cmd = [sys.executable, __file__, "--device", args.device, "--out", str(args.out), *(["--tiny"] if args.tiny else []), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(5.0, timeout))
    with (args.out / f"{args.child}.children.log").open("a") as log:
        log.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(extra)} exited {proc.returncode}: {proc.stderr[-2500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def client_cost(args: argparse.Namespace, kind: str, address: str) -> dict:
    """In a child process: one client of `kind` ('fednano': NanoEdge + split channel; 'fedit-lora': the whole LLM with
    LoRA) built as the method's registry entry builds it, then warm-up and timed training steps on its device."""
    import torch

    from fednano.methods.registry import METHODS
    from fednano.runtime.client import ClientJob

    cfg = run_config(args)
    device = torch.device(args.device)
    reset_peak(device)
    t0 = time.perf_counter()
    rt = client_runtime(cfg, address)
    method = METHODS[kind]
    part = method.client_part(rt)  # fedit-lora: the whole LLM on the client, LoRA injected
    sync(device)
    built, held = time.perf_counter() - t0, memory_now(device)
    job = ClientJob(rt, client_data(rt.task, 0, 1, 0), 0, 1)
    reset_peak(device)  # from here: training (image encoding, steps, the optimiser's state)
    part.train(job, job.data.train, replace(cfg.train, local_steps=1), [])  # warm-up: kernels, the first images
    steps = cfg.train.local_steps
    sync(device)
    t0 = time.perf_counter()
    part.train(job, job.data.train, replace(cfg.train, local_steps=steps), [])
    sync(device)
    step_s = (time.perf_counter() - t0) / steps
    params = sum(p.numel() for p in rt.edge.parameters())
    if kind != "fednano":  # the LLM besides the NanoEdge, whose embedding table is the LLM's own
        params += sum(p.numel() for p in part.llm.model.parameters()) - rt.edge.embed_tokens.weight.numel()
    rt.split.close()
    return {"kind": kind, "parameters_held": params, "held_bytes": held, "peak_bytes": memory_peak(device), "build_s": built,
            "step_s": step_s, "steps": steps, "batch": cfg.train.batch_size,
            "bytes_up_per_step": rt.traffic()["activations_up"] / (steps + 1)}  # the warm-up step sent too


def check_client_memory(args: argparse.Namespace, rec: Record) -> None:
    import torch

    from fednano.backbones.bundle import load_server_llm
    from fednano.backbones.prepare import ensure_prepared
    from fednano.devices import dtype_of
    from fednano.split.server import SplitServer

    device = torch.device(args.device)
    rec["machine"], rec["memory"] = machine_of(device), memory_kind(device)
    cfg = run_config(args)
    t0 = time.perf_counter()
    bundle = ensure_prepared(cfg)  # random weights at the shape of model.checkpoint; the round reuses it
    rec["prepare_s"] = time.perf_counter() - t0
    llm = load_server_llm(bundle, dtype_of(cfg.model.llm_dtype), device)
    llm.set_attention(cfg.model.attention)
    rows = []
    with SplitServer(llm, cfg.split) as server:  # the NanoEdge client's other half (its memory is not the client's)
        for kind in ("fednano", "fedit-lora"):
            rows.append(child(args, "--client-cost", kind, server.address, timeout=time_left(args) - 2))
            rec["rows"] = rows
    nano, lora = rows
    rec["memory_ratio"] = lora["peak_bytes"] / nano["peak_bytes"]
    rec["goal"] = ">= 25x less peak memory on a NanoEdge client than on a whole-LLM LoRA client"
    rec["goal_met"] = rec["memory_ratio"] >= 25


def tensor_bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def round_clients(args: argparse.Namespace, phase: str, address: str) -> dict:
    """In a child process: the round's clients, one thread each (as simulated clients sharing a GPU), doing `phase`
    ('train': the method's training and Fisher from state0; 'evaluate': scoring the merged state on their local
    test split); states travel as safetensors files under --out/round."""
    import torch
    from safetensors.torch import load_file, save_file

    from fednano.methods.registry import method_of
    from fednano.runtime.client import ClientJob

    cfg, device, folder = run_config(args), torch.device(args.device), args.out / "round"
    method, tokens = method_of(cfg), json.loads((folder / "tokens.json").read_text())
    state = load_file(folder / ("state0.safetensors" if phase == "train" else "merged.safetensors"))
    reset_peak(device)
    results: dict[int, dict] = {}

    def work(pid: int) -> None:
        try:
            t0 = time.perf_counter()
            rt, built = runtimes[pid]
            job = ClientJob(rt, client_data(rt.task, pid, CLIENTS, cfg.data.max_local_test), pid, 1)
            if phase == "train":
                update = method.client_train(job, {k: v.clone() for k, v in state.items()})
                save_file(update.state, folder / f"client-{pid}.safetensors")
                if update.fisher is not None:
                    save_file(update.fisher, folder / f"client-{pid}-fisher.safetensors")
                out = {"train_loss": update.train_loss, "num_examples": update.num_examples, "state_bytes": tensor_bytes(update.state),
                       "fisher_bytes": tensor_bytes(update.fisher or {})}
            else:
                out = method.client_evaluate(job, {k: v.clone() for k, v in state.items()})
            rt.split.close()
            results[pid] = {**out, "build_s": built, "seconds": time.perf_counter() - t0, "traffic": rt.traffic()}
        except Exception:  # reported by the parent process, with the client named
            results[pid] = {"error": traceback.format_exc()}

    runtimes = {}
    for pid in range(CLIENTS):  # built in turn: transformers' lazy imports are not safe to race from two threads
        t0 = time.perf_counter()
        runtimes[pid] = (client_runtime(cfg, address, tokens[pid]), time.perf_counter() - t0)
    threads = [threading.Thread(target=work, args=(pid,)) for pid in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = {pid: r["error"] for pid, r in results.items() if "error" in r}
    if errors:
        raise RuntimeError(f"client(s) failed in {phase}: {errors}")
    return {"clients": {str(pid): results[pid] for pid in sorted(results)}, "peak_bytes": memory_peak(device)}


def check_round(args: argparse.Namespace, rec: Record) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from fednano.methods.combiners import ServerMemory
    from fednano.methods.registry import method_of
    from fednano.runtime.server import ServerSide

    device = torch.device(args.device)
    rec["machine"], rec["memory"] = machine_of(device), memory_kind(device)
    cfg = run_config(args)
    folder = args.out / "round"
    folder.mkdir(parents=True, exist_ok=True)
    rec["config"] = {"model": cfg.model.checkpoint, "method": cfg.federation.strategy, "clients": CLIENTS,
                     "local_steps": cfg.train.local_steps, "batch_size": cfg.train.batch_size, "fisher_samples": cfg.train.fisher_samples,
                     "adapter_rank": cfg.adapter.rank}
    t0 = time.perf_counter()
    side = ServerSide(cfg)  # prepares (or reuses) the bundle, builds the LLM, starts the split server, holds its own NanoEdge
    seconds = {"server_build": time.perf_counter() - t0}
    try:
        method = method_of(cfg)
        part = method.trains.server(side)
        state0 = part.initial_state()
        save_file({k: v.contiguous() for k, v in state0.items()}, folder / "state0.safetensors")
        write_json(folder / "tokens.json", [side.client_token(pid) for pid in range(CLIENTS)])  # each client's split-channel token
        held = memory_now(device)
        reset_peak(device)  # from here: the round
        t0 = time.perf_counter()
        train = child(args, "--round-clients", "train", side.address, timeout=time_left(args) - 2)
        seconds["train"] = time.perf_counter() - t0
        rec["train"] = train
        t0 = time.perf_counter()
        thetas = [load_file(folder / f"client-{pid}.safetensors") for pid in range(CLIENTS)]
        fishers = [load_file(p) if (p := folder / f"client-{pid}-fisher.safetensors").exists() else None for pid in range(CLIENTS)]
        counts = [float(train["clients"][str(pid)]["num_examples"]) for pid in range(CLIENTS)]
        merged = method.complete(state0, method.combiner(cfg)(state0, thetas, fishers, counts, cfg.federation, ServerMemory()))
        part.load(merged)
        save_file({k: v.contiguous() for k, v in merged.items()}, folder / "merged.safetensors")
        seconds["merge"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        rec["server_evaluation"] = side.evaluate(part.endpoint())
        seconds["server_evaluation"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        rec["client_evaluation"] = child(args, "--round-clients", "evaluate", side.address, timeout=time_left(args) - 2)
        seconds["client_evaluation"] = time.perf_counter() - t0
        rec["phase_seconds"] = {**seconds, "round": sum(v for k, v in seconds.items() if k != "server_build")}
        rec["server"] = {"held_bytes": held, "peak_bytes": memory_peak(device), "llm_busy_s": side.llm_seconds(),
                         "split_steps": side.split_steps(), "llm_parameters": sum(p.numel() for p in side.llm.model.parameters()),
                         "edge_parameters": side.edge_parameters()}
        rec["bytes"] = round_bytes(state0, train, rec["client_evaluation"])
        rec["note"] = "random weights: accuracies mean nothing; time, memory and bytes do"
    finally:
        side.stop()


def round_bytes(state0: dict, train: dict, evaluation: dict) -> dict:
    """The round's bytes by kind, over both clients: the adapters each message carries down, what training sends up, and
    the split channel's frames as counted by each client's SplitClient (training, then evaluation)."""
    clients = train["clients"].values()
    out = {"adapters_down": 2 * len(train["clients"]) * tensor_bytes(state0),  # the train and the evaluate message
           "adapters_up": sum(c["state_bytes"] for c in clients), "fisher_up": sum(c["fisher_bytes"] for c in clients)}
    for phase in (train, evaluation):
        for c in phase["clients"].values():
            for key, n in c["traffic"].items():
                out[key] = out.get(key, 0) + n
    out["total"] = sum(out.values())
    return out


# ------------------------------------------------------------------ the report
def machine_of(device) -> dict:
    import torch

    from fednano.devices import describe

    return {**describe(device), "torch": torch.__version__, "cuda": torch.version.cuda}


def gib(n: float | None) -> str:
    return "—" if n is None else f"{n / 2**30:.2f} GiB"


def report(results: dict) -> str:
    """results.json -> the Markdown tables of results.md."""
    lines = [f"# FedNano GPU checks ({results['when']}, {results['device']}{', toy shapes (--tiny)' if results['tiny'] else ''})", "",
             "| check | status | seconds (budget) | goal | met |", "|---|---|---:|---|---|"]
    for name, r in results["checks"].items():
        met = {True: "yes", False: "**no**"}.get(r.get("goal_met"), "")
        lines.append(f"| {name} | {r['status']} | {r['seconds']:.0f} ({r['budget_s']:.0f}) | {r.get('goal', '')} | {met} |")
    checks = results["checks"]
    if (t := checks.get("gpu-tests", {})).get("counts"):
        c = t["counts"]
        lines += ["", "## gpu test cases", "", f"`{t['command']}`: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped", ""]
        lines += [f"- failed: {name}" for name in c["failed_tests"]] + [f"- skipped ({n}): {why}" for why, n in c["skip_reasons"].items()]
        lines += [f"- does not import here: {module}: {why}" for module, why in c.get("not_importable", {}).items()]
    if (s := checks.get("server-step", {})).get("rows"):
        lines += ["", "## Server step (ServerLLM.train_steps), random weights, bf16", "",
                  f"bf16 matmul rate measured in the same run: {s.get('matmul_gflops_bf16', 0):,.0f} GFLOP/s", "",
                  "| LLM | batch x tokens | compiled | seconds | TFLOP | / matmul rate | samples/s | activations | compile s |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in s["rows"]:
            if "skipped" in r:
                lines.append(f"| {r['model']} | | {r['compiled']} | skipped: {r['skipped']} | | | | | |")
                continue
            lines.append(f"| {r['model']} ({r['parameters'] / 1e9:.2f}B) | {r['batch']} x {r['tokens']} | {r['compiled']} | "
                         f"{r['seconds']:.3f} | {r['tflop']:.2f} | **{r['fraction_of_matmul']:.3f}** | {r['samples_per_s']:.3g} | "
                         f"{gib(None if r['activation_gib'] is None else r['activation_gib'] * 2**30)} | {r.get('compile_s', 0):.0f} |")
    if (c := checks.get("split-throughput", {})).get("rows"):
        one = c["rows"][0]["samples_per_s"]
        lines += ["", "## Split-server throughput, micro-batched by tokens", "", f"setup: {c['setup']}", "",
                  "| concurrent clients | samples/s | vs 1 client | LLM passes / steps |", "|---:|---:|---:|---:|"]
        lines += [f"| {r['clients']} | {r['samples_per_s']:.1f} | {r['samples_per_s'] / one:.2f}x | {r['llm_passes']} / {r['steps']} |"
                  for r in c["rows"]]
        if "unbatched_32" in c:
            lines.append(f"\n32 clients without micro-batching: {c['unbatched_32']['samples_per_s']:.1f} samples/s")
    if (m := checks.get("client-memory", {})).get("rows"):
        lines += ["", f"## What a client holds and computes ({m['memory']})", "",
                  "| client | parameters held | held after building | peak while training | s / step (batch) |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['kind']} | {r['parameters_held']:,} | {gib(r['held_bytes'])} | {gib(r['peak_bytes'])} | "
                  f"{r['step_s']:.3f} ({r['batch']}) |" for r in m["rows"]]
        if "memory_ratio" in m:
            lines.append(f"\npeak memory, fedit-lora / fednano: {m['memory_ratio']:.1f}x")
    if (r := checks.get("round", {})).get("bytes"):
        lines += ["", f"## One round, {r['config']} ({r['memory']})", "", "| phase | seconds |", "|---|---:|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in r["phase_seconds"].items()]
        srv = r["server"]
        lines += ["", f"server: held {gib(srv['held_bytes'])}, peak {gib(srv['peak_bytes'])}, LLM busy {srv['llm_busy_s']:.1f} s, "
                  f"{srv['split_steps']} split steps; client process ({CLIENTS} clients as threads): peak {gib(r['train']['peak_bytes'])} "
                  f"training, {gib(r['client_evaluation']['peak_bytes'])} evaluating", "", "| bytes | MiB |", "|---|---:|"]
        lines += [f"| {k} | {v / 2**20:,.2f} |" for k, v in r["bytes"].items()]
    failed = {k: v for k, v in checks.items() if v["status"] != "ok"}
    for name, r in failed.items():
        lines += ["", f"## {name}: {r['status']}", "", "```", str(r.get("error", ""))[-3000:], "```"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ running the checks
CHECKS = {"gpu-tests": check_gpu_tests, "server-step": check_server_step, "split-throughput": check_split_throughput,
          "client-memory": check_client_memory, "round": check_round}


def run_child(args: argparse.Namespace) -> int:
    """One check, in this process (the parent made it a fresh one): its results to --out/<check>.json."""
    rec = Record(args.out / f"{args.child}.json")
    try:
        CHECKS[args.child](args, rec)
        return 0
    except BaseException:
        rec["error"] = traceback.format_exc()
        return 1


def run_check(args: argparse.Namespace, name: str, budget: float, env: dict) -> dict:
    """Run check `name` in its own process group, killed (with any process it started) after `budget` seconds."""
    path = args.out / f"{name}.json"
    path.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", name, "--device", args.device, "--out", str(args.out),
           "--deadline", str(time.time() + budget), *(["--tiny"] if args.tiny else []),
           *[a for p in args.extra_path for a in ("--extra-path", p)]]
    t0 = time.perf_counter()
    with (args.out / f"{name}.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=budget)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, status = proc.wait(), "timed out"
    data = json.loads(path.read_text()) if path.exists() else {}
    if status != "ok" and "error" not in data:
        tail = (args.out / f"{name}.log").read_text()[-3000:]
        killed = f"killed after its budget of {budget:.0f} s; what it measured until then is kept\n" if status == "timed out" else ""
        data["error"] = killed + tail
    return {**data, "status": status, "exit_code": rc, "seconds": time.perf_counter() - t0, "budget_s": budget}


def missing(out: Path) -> list[str]:
    """What a finished run under `out` lacks: a check absent from results.json or without its own JSON, or not ok."""
    path = out / "results.json"
    if not path.exists():
        return [f"{path} was not written"]
    checks = json.loads(path.read_text())["checks"]
    problems = [f"{name}: not in results.json" for name in BUDGETS if name not in checks]
    problems += [f"{name}: no {name}.json" for name in checks if not (out / f"{name}.json").exists()]
    return problems + [f"{name}: {r['status']}: {str(r.get('error', ''))[-300:]}" for name, r in checks.items() if r["status"] != "ok"]


def parse_budgets(items: list[str]) -> dict[str, float]:
    budgets = dict(BUDGETS)
    for item in items:
        name, _, seconds = item.partition("=")
        if name not in BUDGETS or not seconds:
            raise SystemExit(f"--budget {item!r}: expected NAME=SECONDS with NAME one of {list(BUDGETS)}")
        budgets[name] = float(seconds)
    return budgets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="where everything computes: 'cuda' (default) or 'cpu' (the rehearsal)")
    ap.add_argument("--tiny", action="store_true", help="toy shapes (a 2-layer LLaVA) for a rehearsal on a CPU")
    ap.add_argument("--out", type=Path, required=True, help="folder for results.json, results.md and each check's JSON and log")
    ap.add_argument("--budget", action="append", default=[], metavar="NAME=SECONDS", help=f"a check's time budget (defaults {BUDGETS})")
    ap.add_argument("--checks", nargs="+", choices=list(BUDGETS), default=list(BUDGETS), help="run only these checks")
    ap.add_argument("--extra-path", action="append", default=[], help="a folder put on the tests' PYTHONPATH (e.g. a carried easy_vqa)")
    ap.add_argument("--verify", action="store_true", help="only check that a finished run under --out has every check, each ok")
    ap.add_argument("--child", choices=list(CHECKS), help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--client-cost", nargs=2, metavar=("KIND", "ADDRESS"), help=argparse.SUPPRESS)
    ap.add_argument("--round-clients", nargs=2, metavar=("PHASE", "ADDRESS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.out = args.out.resolve()
    args.extra_path = [str(Path(p).resolve()) for p in args.extra_path]
    if args.client_cost:
        print(json.dumps(client_cost(args, *args.client_cost)))
        return
    if args.round_clients:
        print(json.dumps(round_clients(args, *args.round_clients)))
        return
    if args.child:
        sys.exit(run_child(args))
    if args.verify:
        problems = missing(args.out)
        print("\n".join(problems) or f"{args.out}: every check ran and is ok")
        sys.exit(1 if problems else 0)
    budgets = parse_budgets(args.budget)
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "FEDNANO_PROGRESS": "off"}
    results = {"when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": args.device, "tiny": args.tiny, "budgets_s": budgets, "checks": {}}
    for name in args.checks:
        print(f"[gpu-checks] {name} (budget {budgets[name]:.0f} s) ...", flush=True)
        results["checks"][name] = r = run_check(args, name, budgets[name], env)
        print(f"[gpu-checks] {name}: {r['status']} in {r['seconds']:.0f} s" + (f", goal met: {r['goal_met']}" if "goal_met" in r else ""),
              flush=True)
        write_json(args.out / "results.json", results)
        (args.out / "results.md").write_text(report(results))
    print((args.out / "results.md").read_text())
    sys.exit(0 if all(r["status"] == "ok" for r in results["checks"].values()) else 1)


if __name__ == "__main__":
    main()
