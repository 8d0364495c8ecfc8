"""The `fednano` command line (typer). Thin: parse, configure logging, call the library."""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from fednano.config import ConfigError, RunConfig, dump_toml, load_config, options_help
from fednano.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="FedNano: federated tuning of multimodal LLMs with the LLM kept on the server.",
)
log = logging.getLogger("fednano")
_DEBUG = {"on": False}


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of an error FedNano would report in one line.")] = False,
) -> None:
    _DEBUG["on"] = debug


def _one_line_errors(command: Callable[..., None]) -> Callable[..., None]:
    """Errors the user can fix (bad config, data, checkpoint, device) end the command with one line naming
    the field, file or sample, and exit code 2; anything else is a bug and keeps its traceback."""

    @functools.wraps(command)
    def wrapped(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except UserError as e:
            if _DEBUG["on"]:
                raise
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    return wrapped

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML run config (see `fednano options`; defaults apply to anything it omits).")
]
BackboneOpt = Annotated[
    str | None,
    typer.Option("--backbone", "-b", help="Shortcut for --set model.backbone=NAME: smol, compose, llava, blip2, idefics3, tiny."),
]
CheckpointOpt = Annotated[
    Path | None, typer.Option("--checkpoint", help="Shortcut for --set model.checkpoint=DIR (a local llava / blip2 checkpoint).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override one option, e.g. --set federation.rounds=5 (repeatable; value parsed as TOML)."),
]


def _setup_logging(log_file: Path | None = None) -> None:
    from rich.logging import RichHandler

    handlers: list[logging.Handler] = [RichHandler(level=logging.INFO, show_path=False, rich_tracebacks=False)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setLevel(logging.INFO)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(fh)
    # Third-party libraries speak at WARNING and above; FedNano's own loggers at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=handlers, force=True)
    logging.getLogger("fednano").setLevel(logging.INFO)


def _overrides(pairs: list[str] | None) -> dict:
    import tomllib

    out = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set {pair!r}: expected section.field=value")
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw  # a bare string
    return out


def _load(config: Path | None, sets: list[str] | None, backbone: str | None = None, checkpoint: Path | None = None) -> RunConfig:
    overrides = _overrides(sets)
    if backbone:
        overrides["model.backbone"] = backbone
    if checkpoint:
        overrides["model.checkpoint"] = str(checkpoint)
    return load_config(config, overrides)


_OPTIONS_EPILOG = "Config options (TOML tables; override any with --set section.field=value):\n\n" + "\n\n".join(
    f"  {line}" for line in options_help().splitlines()
)


@app.command(epilog=_OPTIONS_EPILOG)
@_one_line_errors
def run(
    config: ConfigOpt = None,
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="Results folder: config.toml, results.json, adapters.safetensors, accuracy.png, table.md, run.log."
        ),
    ] = Path("results/latest"),
    backbone: BackboneOpt = None,
    checkpoint: CheckpointOpt = None,
    set_: SetOpt = None,
    resume: Annotated[
        Path | None,
        typer.Option("--resume", help="Continue the run in this results folder after its last completed round (uses its config.toml)."),
    ] = None,
) -> None:
    """Run a federated experiment as a Flower simulation (prepares the backbone first if needed)."""
    if resume is not None:
        if config or set_ or backbone or checkpoint:
            typer.echo("error: --resume uses the run's own config.toml; drop --config/--set/--backbone/--checkpoint", err=True)
            raise typer.Exit(2)
        config, output = resume / "config.toml", resume
        if not config.exists():
            typer.echo(f"error: {config} not found: not a FedNano results folder", err=True)
            raise typer.Exit(2)
    cfg = _load(config, set_, backbone, checkpoint)
    from fednano.federation.simulation import check_devices, simulate
    from fednano.methods.registry import method_of
    from fednano.runtime.server import preflight

    check_devices(cfg)
    method_of(cfg).check(cfg)
    preflight(cfg)  # devices, data and the backbone's source, before anything is created
    _setup_logging(output / "run.log")
    t0 = time.time()
    res = simulate(cfg, output, resume=resume is not None)
    f = res["final"]
    log.info(
        "done in %.0f s: global accuracy %.4f (zero-shot %.4f); results in %s",
        time.time() - t0,
        f["global_accuracy"],
        f["zero_shot_accuracy"],
        output,
    )
    typer.echo((output / "table.md").read_text())


@app.command(epilog=_OPTIONS_EPILOG)
@_one_line_errors
def prepare(config: ConfigOpt = None, backbone: BackboneOpt = None, checkpoint: CheckpointOpt = None, set_: SetOpt = None) -> None:
    """Split the backbone into client and server parts, pre-training a composed connector (cached; `run` does this when needed)."""
    cfg = _load(config, set_, backbone, checkpoint)
    _setup_logging()
    from fednano.backbones.prepare import ensure_prepared

    typer.echo(str(ensure_prepared(cfg)))


@app.command("deploy-run")
@_one_line_errors
def deploy_run(
    config: Annotated[Path, typer.Option("--config", "-c", help="The run config (TOML), as the SuperLink's machine sees it.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The results folder, on the SuperLink's machine.")],
    app_dir: Annotated[Path, typer.Option("--app", help="The FedNano folder Flower packs as the app (pyproject.toml at its root).")]
    = Path("."),
    superlink: Annotated[str | None, typer.Option("--superlink", help="The connection in $FLWR_HOME/config.toml (default: its default).")]
    = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --output after its last completed round.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="Do not stream the run's log.")] = False,
) -> None:
    """Start a deployed run with `flwr run`, follow it (`flwr log`, `flwr ls`) and exit with its verdict: 0 when Flower
    finished it as completed and results.json holds its final scores, 1 otherwise (`flwr run` itself exits 0 even
    when the ServerApp fails)."""
    from fednano.federation.deploy import deploy_run as follow

    outcome = follow(app_dir, config, output, superlink, resume, stream=not quiet)
    if not outcome.ok:
        typer.echo(f"error: {outcome.problem}", err=True)
        raise typer.Exit(1)
    typer.echo(f"run {outcome.run_id} {outcome.status}; results in {outcome.results}")


bundle_app = typer.Typer(no_args_is_help=True, help="Ship the client bundle (NanoEdge) from the server to nodes, by content digest.")
app.add_typer(bundle_app, name="bundle")


@bundle_app.command("pack", epilog=_OPTIONS_EPILOG)
@_one_line_errors
def bundle_pack(
    output: Annotated[Path, typer.Argument(metavar="OUT.tar", help="The file to write (copy it to each node).", show_default=False)],
    config: ConfigOpt = None, backbone: BackboneOpt = None, checkpoint: CheckpointOpt = None, set_: SetOpt = None,
) -> None:
    """On the server (it holds the LLM): prepare the run's backbone if needed and pack its client bundle, with its
    manifest, into OUT.tar. Prints the bundle's digest, which every message of the run names."""
    cfg = _load(config, set_, backbone, checkpoint)
    _setup_logging()
    from fednano.backbones.digest import pack
    from fednano.backbones.prepare import ensure_prepared

    d = pack(ensure_prepared(cfg) / "client", output)
    typer.echo(f"packed NanoEdge bundle sha256:{d} into {output}")


@bundle_app.command("unpack")
@_one_line_errors
def bundle_unpack(
    file: Annotated[Path, typer.Argument(metavar="FILE.tar", help="A file `fednano bundle pack` wrote.", show_default=False)],
    cache_dir: Annotated[Path | None, typer.Option(
        "--cache-dir", help="The node's cache (default: $FEDNANO_CACHE or ~/.cache/fednano; its node config's cache-dir if set).")]
    = None,
    digest: Annotated[str | None, typer.Option("--digest", help="Refuse the file unless it is this bundle (the sha256 pack printed).")]
    = None,
) -> None:
    """On a node: check every file of FILE.tar against its manifest (and --digest) and put the bundle in the node's
    cache (<cache>/nanoedge/<digest>/), where the node's ClientApp finds it by the digest the run's messages name.
    No LLM weight is needed, read or written."""
    from fednano.backbones.digest import unpack
    from fednano.config import default_cache_dir

    want = digest.removeprefix("sha256:") if digest else None
    if want is not None and (len(want) != 64 or any(c not in "0123456789abcdef" for c in want)):
        from fednano.backbones.bundle import BundleError

        raise BundleError(f"--digest {digest!r}: give the whole sha256 (64 hex digits) that `fednano bundle pack` printed")
    d, folder = unpack(file, cache_dir or Path(default_cache_dir()).expanduser(), expected=want)
    typer.echo(f"NanoEdge bundle sha256:{d} verified and held in {folder}")


@app.command()
@_one_line_errors
def footprint(
    backbone: Annotated[
        list[str] | None, typer.Option("--backbone", "-b", help="llava-1.5-7b, minigpt4 or smol (repeatable; default: all three).")
    ] = None,
    rank: Annotated[int, typer.Option(help="NanoAdapter rank r.")] = 64,
    batch: Annotated[int, typer.Option(help="Samples per split step, for the activation bytes.")] = 8,
    text_tokens: Annotated[int, typer.Option(help="Text tokens per sample, for the activation bytes.")] = 64,
    steps: Annotated[int, typer.Option(help="Local split steps per round, for a client-round's bytes.")] = 25,
    fisher_samples: Annotated[int, typer.Option(help="Samples of the Fisher pass, for a client-round's bytes.")] = 32,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a Markdown table.")] = False,
) -> None:
    """Client/server parameters, storage reduction and traffic, from real configurations (no weights needed).

    Traffic per split step and per client-round for each split protocol (split.protocol): a round counts the
    adapters down and up, the Fisher up, the split steps, the Fisher pass and (cached protocols) every image of
    the round sent once, as in a first round."""
    import json

    from fednano.backbones.footprint import FOOTPRINTS, markdown
    from fednano.backbones.footprint import footprint as measure

    names = backbone or list(FOOTPRINTS)
    try:
        rows = [measure(n, rank, batch, text_tokens, steps, fisher_samples) for n in names]
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps([r.as_dict() for r in rows], indent=2) if as_json else markdown(rows))


ClientOpt = Annotated[int | None, typer.Option(
    "--client", help="A client's own model (its partition id), where the method keeps one: local (its adapters), feddpa-f "
    "(the global LoRA plus its personal LoRA). Default: the global model.")]
ClientStateOpt = Annotated[Path | None, typer.Option(
    "--client-state", help="With --client on feddpa-f: the folder holding the client's personal LoRA (a deployed node's "
    "state-dir; default RUN_DIR/client-state, where simulated clients keep it).")]


@app.command()
@_one_line_errors
def export(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A finished `fednano run` results folder.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="New folder for the exported model (must be empty or absent).")],
    client: ClientOpt = None,
    client_state: ClientStateOpt = None,
) -> None:
    """Write the tuned MLLM as a standard checkpoint, the NanoAdapters folded into its weights and any LoRA
    merged (PEFT's merge_and_unload): no cost at inference.

    llava / blip2 runs: a LlavaForConditionalGeneration / Blip2ForConditionalGeneration folder that plain
    transformers loads. smol / compose / tiny: one folder with its own code that AutoModelForImageTextToText and
    AutoProcessor load with trust_remote_code=True, without FedNano, and vision/ (the NanoEdge with the adapters
    folded, for fednano.backbones.bundle.load_nanoedge). --client ID: that client's own model, where
    the method keeps one (local; feddpa-f: the global LoRA plus the client's personal LoRA).
    """
    _setup_logging()
    from fednano.export import export_run

    typer.echo(f"exported to {export_run(run_dir, output, client, client_state)}")


@app.command()
@_one_line_errors
def generate(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR|EXPORT_DIR", help="A finished `fednano run` results folder, or a "
                                            "folder `fednano export` wrote.", show_default=False)],
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="The question (with --image: about that image).")] = None,
    image: Annotated[Path | None, typer.Option("--image", "-i", help="An image file the question is about.")] = None,
    input_file: Annotated[Path | None, typer.Option(
        "--input", help="Many questions: LLaVA-JSON (.json) or JSONL (.jsonl, one {\"prompt\", \"image\"} per line; images "
        "relative to the file).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="With --input: write the answers here as JSONL.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most tokens in an answer.")] = 32,
    temperature: Annotated[float, typer.Option(min=0.0, help="0: greedy; above 0: sample at this temperature.")] = 0.0,
    top_p: Annotated[float, typer.Option(max=1.0, help="With sampling: keep the smallest set of tokens with this much "
                                         "probability (nucleus), in (0, 1].")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the sampling.")] = 0,
    device: Annotated[str, typer.Option(help="Where to run: auto, cpu, cuda, cuda:N.")] = "auto",
    client: ClientOpt = None,
    client_state: ClientStateOpt = None,
) -> None:
    """Answer questions in the tuned model's own words (free-form generation, in process).

    One question: --prompt (and --image); the answer streams to the terminal. Many: --input FILE, with a
    progress bar; --output writes {"id", "prompt", "answer", "reference"} lines.
    """
    if (prompt is None) == (input_file is None):
        typer.echo("error: give --prompt (and --image) or --input FILE", err=True)
        raise typer.Exit(2)
    if top_p <= 0:
        typer.echo("error: --top-p must be in (0, 1]", err=True)
        raise typer.Exit(2)
    _setup_logging()
    from fednano.generate import answer, load_tuned, read_requests
    from fednano.split.endpoint import Decoding

    samples = list(read_requests(input_file)) if input_file is not None else []  # bad input fails before the model loads
    tuned = load_tuned(run_dir, device, client, client_state)
    decoding = Decoding(max_new_tokens, temperature, top_p, seed)
    if prompt is not None:
        images = [str(image)] if image else []
        content = f"<image>\n{prompt}" if image and "<image>" not in prompt else prompt
        answer(tuned, content, images, decoding, stream=lambda piece: typer.echo(piece, nl=False))
        typer.echo()
        return
    _answer_file(tuned, samples, output, decoding)


def _answer_file(tuned: Any, samples: list, output: Path | None, decoding: Any) -> None:
    import json

    from fednano.generate import answer
    from fednano.progress import progress_bar

    lines = []
    with progress_bar(len(samples), "answering") as bar:
        for s in samples:
            text = answer(tuned, s.content(), list(s.images), decoding)
            lines.append({"id": s.uid, "prompt": s.question, "answer": text, "reference": s.answer})
            typer.echo(f"{s.uid}: {text}")
            bar.update(1)
    if output is not None:
        from fednano.io import atomic_write_text

        atomic_write_text(output, "".join(json.dumps(line) + "\n" for line in lines))
        typer.echo(f"wrote {output}")


@app.command()
@_one_line_errors
def leakage(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A finished `fednano run` results folder.", show_default=False)],
    per_client: Annotated[int, typer.Option(min=1, help="Training samples of each client to attack.")] = 8,
    pool: Annotated[int, typer.Option(min=2, help="Candidate images the server matches each received image against "
                                      "(the true ones plus others from the clients' data).")] = 200,
    device: Annotated[str, typer.Option(help="Where to compute: cpu, cuda, cuda:N.")] = "cpu",
) -> None:
    """What an honest-but-curious server recovers from the split channel's training frames: text tokens (nearest
    row of its embedding table), answer tokens (sent in the clear) and images (top-1 retrieval in a pool), with
    the adapters at initialisation and the run's final ones. Writes leakage.json and leakage.md in RUN_DIR.
    """
    _setup_logging()
    from fednano.leakage import audit_run, write_report

    typer.echo(write_report(run_dir, audit_run(run_dir, per_client, pool, device)))


@app.command()
def options() -> None:
    """List every config option with its default and meaning."""
    typer.echo(options_help())


@app.command("example-config")
def example_config() -> None:
    """Print a complete config file with every default and its help as comments."""
    typer.echo(dump_toml(RunConfig().to_dict(), with_help=True))


SweepFileOpt = Annotated[Path, typer.Option(
    "--config", "-c", help="Sweep file (TOML): a \\[sweep] table (base_config, output, \\[sweep.set] overrides) and one or more "
    "\\[\\[grid]] tables of methods, alphas, num_clients, seeds (documented in configs/sweeps/example.toml).")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the planned runs (and which would be skipped or resumed) "
                                          "without running anything.")]
JobsOpt = Annotated[int, typer.Option("--jobs", "-j", min=1, help="Runs at once. Each run already uses every core (the server LLM on one "
                                      "thread, clients in Ray actors), so 1 is right on small machines.")]
RunDirsArg = Annotated[list[Path], typer.Argument(
    metavar="RUN_DIR...", help="Run folders, or folders containing run folders (searched recursively for results.json).",
    show_default=False)]
ReportOutOpt = Annotated[Path | None, typer.Option(
    "--output", "-o", help="Where to write table.md/.csv, paired.csv, convergence.md/.csv/.png, cost.md/.csv, curves.png, "
    "accuracy_vs_bytes.png, and where the runs call for them privacy.md/.csv, dp.md/.csv, verdicts.md/.csv "
    "(default: <first RUN_DIR>/report).")]
BaselineOpt = Annotated[str, typer.Option(
    "--baseline", help="Method every other method is compared with, seed by seed (paired tables: the mean difference, its 95 % "
    "interval, seeds won).")]
TargetOpt = Annotated[float, typer.Option(
    "--target", min=0.0, max=1.0, help="Convergence: count the rounds and bytes each run needs to reach this fraction of "
    "centralized's best score (validation accuracy where the runs have a validation set).")]


@app.command()
@_one_line_errors
def sweep(config: SweepFileOpt, dry_run: DryRunOpt = False, jobs: JobsOpt = 1) -> None:
    """Run a grid of experiments (methods x Dirichlet alpha x clients x seeds), one results folder each; resumable.

    Each run is a `fednano run` subprocess in <output>/<method>/a<alpha>-c<clients>-s<seed>. Finished runs are
    skipped, interrupted ones resumed; a failed run does not stop the sweep (exit code 1 at the end).
    <output>/sweep.json lists every run with its status and final global accuracy. With `archive` in the sweep file,
    finished runs (without tensors) and the running run's last completed round (with its checkpoint) are kept there,
    and a fresh checkout's sweep skips or resumes them.
    """
    from fednano.experiments.sweep import describe_plan, execute, load_sweep, plan

    sw = load_sweep(config)
    plan(sw)
    if dry_run:
        typer.echo(describe_plan(sw))
        return
    t0 = time.time()
    failed = execute(sw, jobs=jobs)
    counts = {s: sum(p.status == s for p in sw.points) for s in ("done", "skipped", "failed")}
    typer.echo(f"sweep: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed in {time.time() - t0:.0f} s; "
               f"summary in {sw.output / 'sweep.json'}")
    if failed:
        typer.echo("failed runs:", err=True)
        for p in failed:
            typer.echo(f"  {p.name}: {p.error}; see {p.run_dir / 'run.log'} (and {p.run_dir / 'sweep.log'})", err=True)
        raise typer.Exit(1)


@app.command()
@_one_line_errors
def report(run_dirs: RunDirsArg, output: ReportOutOpt = None, baseline: BaselineOpt = "fednano", target: TargetOpt = 0.9) -> None:
    """Tables (mean ± std over seeds, best in bold), paired differences, convergence (rounds and bytes to a target),
    accuracy curves and costs from finished results folders.

    Each RUN_DIR is a run folder or any folder holding run folders (searched recursively for results.json,
    e.g. a sweep's output). Only finished runs count; unfinished ones are listed in a note.
    """
    missing = [d for d in run_dirs if not d.is_dir()]
    if missing:
        typer.echo(f"error: not a folder: {', '.join(map(str, missing))}", err=True)
        raise typer.Exit(2)
    from fednano.experiments.publish import build_report

    try:
        rep = build_report(run_dirs, output if output is not None else run_dirs[0] / "report", baseline=baseline, target=target)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    sections = [("Final global accuracy (%), mean ± std over seeds", rep.global_table),
                ("Global test accuracy (%) at the best validation round, mean ± std over seeds", rep.best_table),
                ("Mean local-test (personalised) accuracy (%), mean ± std over seeds", rep.local_table),
                (f"Paired differences (points), {baseline} minus each method: mean [95 % interval] "
                 f"(seeds {baseline} was higher / compared)", rep.paired_table),
                (f"Rounds and MiB to {target:g} of the reference's best score", rep.convergence_table),
                ("Cost per method", rep.cost_table)]
    for title, table in sections:
        if table:
            typer.echo(f"{title}\n\n{table}\n")
    for n in rep.notes:
        typer.echo(f"note: {n}")
    typer.echo("wrote: " + ", ".join(str(f) for f in rep.files))


def main() -> None:  # pragma: no cover
    sys.exit(app())
