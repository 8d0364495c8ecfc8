"""Run configuration: one dataclass per component, nested in one `RunConfig`.

Every field carries its help text (`help=` in the metadata); `fednano options`
and the example config are generated from it, so documentation cannot drift.
Configs are TOML files whose tables mirror the dataclasses (`[model]`,
`[adapter]`, ...). Unknown keys and out-of-range values raise `ConfigError`
naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fednano.backbones.registry import BACKBONES
from fednano.data import DATASETS as _DATASETS
from fednano.errors import ConfigError as ConfigError  # (defined with the other user errors; callers import it from here)
from fednano.federation import keys
from fednano.split.protocols import PROTOCOLS


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


def default_cache_dir() -> str:
    return os.environ.get("FEDNANO_CACHE", str(Path.home() / ".cache" / "fednano"))




def methods() -> dict:
    """The method registry (fednano/methods/registry.py), whose names and checks validate `federation.strategy`. Imported
    when a config is checked, not with this module: the methods are built on the configs defined here."""
    from fednano.methods.registry import METHODS

    return METHODS

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
DEVICE_MAPS = ("", "auto", "balanced", "balanced_low_0", "sequential")
ATTENTION = ("sdpa", "eager")  # the LLM's attention kernels (transformers' attn_implementation)


@dataclass
class ModelConfig:
    backbone: str = _f("smol", "MLLM: 'smol' (EfficientNet-Lite0 + SmolLM2-135M, from packages), 'compose' (vision_encoder + "
                               "connector + the causal LM at llm_path), 'llava', 'blip2' or 'idefics3' (SmolVLM; a local HF checkpoint at "
                               "`checkpoint`), 'tiny' (random, for tests).")
    checkpoint: str = _f("", "llava / blip2 / idefics3: local directory of a HF LlavaForConditionalGeneration / "
                             "Blip2ForConditionalGeneration / Idefics3ForConditionalGeneration checkpoint (config, weights, tokenizer).")
    llm_path: str = _f("", "compose: local directory of a HF causal LM (config, weights, tokenizer).")
    vision_encoder: str = _f("efficientnet-lite0", "compose: vision encoder ('efficientnet-lite0', ImageNet weights from its package).")
    cache_dir: str = _f("", "Where prepared backbones are cached (default: $FEDNANO_CACHE or ~/.cache/fednano).")
    visual_grid: int = _f(3, "smol/compose: visual tokens per side; the encoder's 7x7 feature grid is average-pooled to grid x grid "
                             "tokens. 3 (9 tokens) keeps sequences short; easy-vqa images hold one shape.")
    image_size: int = _f(224, "smol/compose: resolution images are resized to before the vision encoder (llava/blip2 use their "
                              "checkpoint's).")
    llm_dtype: str = _f("bfloat16", "Server LLM compute dtype: 'bfloat16' (about 4x faster on CPU, the norm on GPUs) or 'float32'. "
                                    "The LLM is loaded straight into it, with no float32 copy.")
    server_device: str = _f("auto", "Where the server LLM computes: 'auto' (the first CUDA GPU when there is one, else the CPU), "
                                    "'cpu', 'cuda' or 'cuda:N'.")
    server_device_map: str = _f("", "Shard the frozen LLM across the visible GPUs with accelerate's device_map ('auto', 'balanced', "
                                    "'balanced_low_0', 'sequential') when it does not fit one; '' keeps it whole on server_device.")
    attention: str = _f("sdpa", "The LLM's attention kernel: 'sdpa' (PyTorch's fused scaled-dot-product attention) or 'eager' (plain "
                                "matmul + softmax). At this project's short sequences on a CPU the fused kernel's backward is about a "
                                "fifth of a split step (BENCHMARKS, 'The split step'); the two agree within bf16 rounding.")
    compile: bool = _f(False, "Run the server LLM's training steps under torch.compile (inductor). The first step compiles, "
                              "per server process (1 to 3 minutes on a 2-core CPU); later steps are faster: on the AMD EPYC, "
                              "1.22x with 'sdpa' and 1.35x with 'eager' attention (BENCHMARKS, 'The split step'). Gradients "
                              "agree within bf16 rounding, not bit for bit. Scoring and generation stay eager.")
    client_device: str = _f("auto", "Where each client's NanoEdge (vision encoder, connector, embedding table, adapters, "
                                    "image-feature cache) lives: 'auto' (the GPU the client process may use, else the CPU), 'cpu', "
                                    "'cuda' or 'cuda:N'. A simulated client sees a GPU only with federation.client_gpus > 0.")
    random_init: bool = _f(False, "llava / blip2 / idefics3: random weights built from the configuration at `checkpoint` (a folder with "
                                  "config.json, or a shipped name: 'llava-1.5-7b', 'minigpt4'), for measuring time, memory and bytes "
                                  "at the paper's scale without the weights. Never for accuracy: results.json says so and `fednano "
                                  "report` refuses such runs.")

    def __post_init__(self) -> None:
        _check(self.backbone in BACKBONES, "model.backbone", f"unknown backbone {self.backbone!r}; choose one of {list(BACKBONES)}")
        BACKBONES[self.backbone].check(self)  # the fields it needs (backbones/registry.py)
        _check(self.vision_encoder == "efficientnet-lite0", "model.vision_encoder", "only 'efficientnet-lite0' is available")
        _check(1 <= self.visual_grid <= 7, "model.visual_grid", "must be between 1 and 7")
        _check(self.image_size >= 32, "model.image_size", "must be >= 32")
        _check(self.llm_dtype in ("bfloat16", "float32"), "model.llm_dtype", "must be 'bfloat16' or 'float32'")
        for name in ("server_device", "client_device"):
            _check(
                bool(DEVICE_PATTERN.match(getattr(self, name))),
                f"model.{name}",
                f"{getattr(self, name)!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'",
            )
        _check(self.server_device_map in DEVICE_MAPS, "model.server_device_map", f"must be one of {list(DEVICE_MAPS)}")
        _check(self.attention in ATTENTION, "model.attention", f"must be one of {list(ATTENTION)}")
        _check(
            not (self.random_init and self.server_device_map),
            "model.server_device_map",
            "random weights are built on server_device; sharding is for real checkpoints",
        )

    @property
    def resolved_cache_dir(self) -> Path:
        return Path(os.path.expanduser(self.cache_dir or default_cache_dir()))


@dataclass
class AdapterConfig:
    rank: int = _f(16, "Rank r of each NanoAdapter (A: d->r, B: r->d).")
    alpha: float = _f(32.0, "Scale numerator: the adapter adds (alpha / rank) * B(A(x)).")
    dropout: float = _f(0.0, "Dropout on the adapter input during training.")
    lora_rank: int = _f(8, "fedit-lora / feddpa-f: rank of the LoRA inside the LLM (FedIT's default).")
    lora_alpha: float = _f(16.0, "fedit-lora / feddpa-f: LoRA scale numerator (alpha / rank).")
    lora_targets: str = _f(
        "q_proj,v_proj",
        "fedit-lora / feddpa-f: comma-separated LLM linear layers that get LoRA (FedIT: the attention query and value projections).",
    )

    def __post_init__(self) -> None:
        _check(self.rank >= 1, "adapter.rank", "must be >= 1")
        _check(self.lora_rank >= 1, "adapter.lora_rank", "must be >= 1")
        _check(bool(self.lora_targets.strip()), "adapter.lora_targets", "must name at least one layer")
        _check(self.alpha > 0, "adapter.alpha", "must be > 0")
        _check(0.0 <= self.dropout < 1.0, "adapter.dropout", "must be in [0, 1)")


@dataclass
class PrepareConfig:
    caption_images: int = _f(
        800, "easy-vqa train images held out for connector pre-training (stage-1 alignment); federated clients never see them."
    )
    steps: int = _f(150, "Connector pre-training steps.")
    batch_size: int = _f(16, "Connector pre-training batch size.")
    lr: float = _f(1e-3, "Connector pre-training learning rate (AdamW).")
    seed: int = _f(0, "Seed for the held-out split and the connector's initialisation.")

    def __post_init__(self) -> None:
        _check(self.caption_images >= 1, "prepare.caption_images", "must be >= 1")
        _check(self.steps >= 0, "prepare.steps", "must be >= 0")
        _check(self.batch_size >= 1, "prepare.batch_size", "must be >= 1")
        _check(self.lr > 0, "prepare.lr", "must be > 0")


DATASETS = tuple(_DATASETS)  # the dataset registry's names (fednano/data/__init__.py)
SCORING = ("candidates", "generate")
WIRE_DTYPES = ("bfloat16", "float32", "float8_e4m3", "float8_e5m2", "int8")  # the last three: split.frames.SCALED
SPLIT_PROTOCOLS = tuple(PROTOCOLS)  # the protocol registry's names (split/protocols.py)


@dataclass
class DataConfig:
    dataset: str = _f("easy-vqa", "Dataset: 'easy-vqa' (ships inside its package), 'scienceqa', 'iconqa' or 'llava-json' (from `path`).")
    path: str = _f(
        "", "scienceqa / iconqa / llava-json: where the data lies (docs/guides/data.md: official layouts, HF parquet, LLaVA JSON)."
    )
    test_path: str = _f(
        "", "llava-json: the test file (default: `<stem>_test.json` beside data.path, with data.path's `<stem>_train.json` "
        "as the training file, when both exist; else data.path split 90/10 by seed)."
    )
    image_folder: str = _f(
        "", "llava-json: the folder the files' image paths are relative to, as LLaVA's --image_folder (default: each file's folder)."
    )
    train_split: str = _f("train", "Split the clients' data comes from (scienceqa / iconqa: 'train', 'val', ...).")
    test_split: str = _f("test", "Split the global test set comes from.")
    subtasks: str = _f("choose_txt,choose_img,fill_in_blank", "iconqa: comma-separated sub-tasks to load.")
    skip_invalid: bool = _f(
        False, "Skip malformed samples (missing image, missing field, answer out of range) and report them, instead of stopping."
    )
    num_clients: int = _f(5, "Number of federated clients (partitions).")
    partitioner: str = _f(
        "dirichlet", "'dirichlet' (non-IID over `partition_by`), 'iid', or 'natural' (one client per value of `partition_by`)."
    )
    dirichlet_alpha: float = _f(1.0, "Dirichlet concentration: small (0.1) = highly non-IID, large (5) = near IID.")
    partition_by: str = _f(
        "answer", "Field the partition is drawn over: 'answer', or a category such as 'subject' (scienceqa) or 'subtask' (iconqa)."
    )
    min_partition_size: int = _f(20, "Fewest samples a client may get; the Dirichlet partitioner redraws until every client has this many.")
    local_test_fraction: float = _f(0.1, "Fraction of each client's partition held out as its local test split.")
    max_local_test: int = _f(64, "Cap on each client's local test split (evaluation cost).")
    global_test_samples: int = _f(500, "Questions sampled from the test split for the global test set (0 = all).")
    validation_samples: int = _f(
        0, "Questions held out of the training pool before it is partitioned (seeded; never trained on, so drawn from the "
        "clients' training distribution) to choose rounds on: the server scores them every federation.eval_every rounds, and "
        "the global test set only at the last round and at the best validation round. 0: no validation set; the global test "
        "set is scored every round."
    )
    seed: int = _f(0, "Seed for partitioning and test sampling.")
    scoring: str = _f(
        "candidates", "How answers are scored: 'candidates' (the most likely answer of the task's closed set) or 'generate' "
        "(also the model's own greedy answer, by exact match after normalisation; results.json then reports both scores)."
    )
    answer_tokens: int = _f(16, "With scoring = 'generate': the most tokens an answer may have.")
    on_nodes: bool = _f(
        False, "Deployment: each node brings its own data (node config data-path, dataset, test-path, image-folder) and trains on "
        "all of it, keeping its own test split; this config's data is then only the server's global test set, nothing is "
        "partitioned, and partition.json holds what the nodes report (sample counts and label histograms, no samples)."
    )
    server_test: bool = _f(
        True, "The server scores the zero-shot model and each round's global state on its own global test set (this section's "
        "data). false (with on_nodes): the server holds no data at all, and the global accuracy is the example-weighted mean "
        "of the clients' evaluations on their own test splits."
    )

    def __post_init__(self) -> None:
        _check(self.dataset in DATASETS, "data.dataset", f"unknown dataset {self.dataset!r}; choose one of {list(DATASETS)}")
        _check(not _DATASETS[self.dataset].needs_path or bool(self.path), "data.path",
               f"dataset {self.dataset!r} needs the path of its files")
        _check(self.num_clients >= 1, "data.num_clients", "must be >= 1")
        _check(self.partitioner in ("dirichlet", "iid", "natural"), "data.partitioner", "must be 'dirichlet', 'iid' or 'natural'")
        _check(self.dirichlet_alpha > 0, "data.dirichlet_alpha", "must be > 0")
        _check(bool(self.partition_by), "data.partition_by", "must name a field")
        _check(self.min_partition_size >= 2, "data.min_partition_size", "must be >= 2")
        _check(0.0 < self.local_test_fraction < 1.0, "data.local_test_fraction", "must be in (0, 1)")
        _check(self.max_local_test >= 1, "data.max_local_test", "must be >= 1")
        _check(self.global_test_samples >= 0, "data.global_test_samples", "must be >= 0")
        _check(self.validation_samples >= 0, "data.validation_samples", "must be >= 0")
        _check(self.scoring in SCORING, "data.scoring", f"must be one of {list(SCORING)}")
        _check(self.answer_tokens >= 1, "data.answer_tokens", "must be >= 1")

    def to_key(self) -> str:
        """What the loaded data depends on (how answers are scored does not change it)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("scoring", "answer_tokens", "on_nodes", "server_test")}
        return json.dumps(fields, sort_keys=True)


@dataclass
class TrainConfig:
    local_steps: int = _f(25, "Optimiser steps each client takes per round.")
    batch_size: int = _f(8, "Client batch size (samples per split step).")
    lr: float = _f(2e-3, "Client learning rate (AdamW on the NanoAdapters).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    fisher_samples: int = _f(32, "Samples for the diagonal Fisher (extra pass after local training).")
    eval_batch_size: int = _f(16, "Batch size when scoring candidate answers.")

    def __post_init__(self) -> None:
        _check(self.local_steps >= 1, "train.local_steps", "must be >= 1")
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(self.lr > 0, "train.lr", "must be > 0")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(self.fisher_samples >= 1, "train.fisher_samples", "must be >= 1")
        _check(self.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1")


@dataclass
class FederationConfig:
    strategy: str = _f(
        "fednano",
        "Method: 'fednano' (Fisher merging, Fisher from an extra pass), 'fednano-ef' (Fisher from the "
        "training gradients, no extra pass), 'fednano-product' (Fisher merging of each adapter's product B·A, "
        "re-factorised by SVD), 'fednano-ffa' (A frozen at the shared seed; only B trains and is merged), "
        "'fedavg' (same adapters, weights n_k only: the no-Fisher "
        "ablation), 'fedprox' (FedAvg + proximal term), 'fedadam' / 'fedyogi' (FedAvg then a server-side "
        "Adam / Yogi step), 'local' (each client trains alone, no aggregation), 'centralized' (one trainer "
        "on all clients' data: the upper bound), 'fedit-lora' (the client holds the whole MLLM; FedAvg of "
        "LoRA inside the LLM), 'feddpa-f' (fedit-lora's global LoRA + a personal local LoRA per client).",
    )
    proximal_mu: float = _f(0.01, "fedprox: weight mu of the proximal term mu/2 ||theta - theta_global||^2 the client adds to its loss.")
    fisher_type: str = _f(
        "empirical",
        "fednano: 'empirical' (squared gradients at the true answers) or 'exact' (expectation over "
        "the model's own answer distribution on the candidate set, as in Fisher merging; one backward "
        "per candidate). fednano-ef is always empirical.",
    )
    server_lr: float = _f(
        0.01,
        "fedadam/fedyogi: server learning rate eta. Adam's step is about eta per entry, so 0.01 is the order "
        "of one round of local AdamW movement at the default local_steps and lr; fixed before any run, not "
        "tuned on test data.",
    )
    server_beta1: float = _f(0.9, "fedadam/fedyogi: first-moment decay.")
    server_beta2: float = _f(0.99, "fedadam/fedyogi: second-moment decay.")
    server_tau: float = _f(1e-3, "fedadam/fedyogi: adaptivity tau (added to sqrt(v)).")
    rounds: int = _f(3, "Federated rounds.")
    eval_every: int = _f(
        1, "With data.validation_samples > 0: score the global model on the validation set every this many rounds (and at the last "
        "round). The round with the best validation accuracy is kept, and scored on the global test set at the end."
    )
    client_eval_every_round: bool = _f(
        False, "With data.validation_samples > 0: the clients also score their local test splits at every validation round (by "
        "default only at the last round and the best validation round)."
    )
    fraction_train: float = _f(1.0, "Fraction of clients sampled per round.")
    fraction_evaluate: float = _f(
        1.0, "Fraction of clients that score each round's model on their local test split (a seeded sample per round; "
        "with many clients, evaluating all of them costs more than the training)."
    )
    min_train_clients: int = _f(2, "Fewest valid replies a round needs; otherwise the previous global adapters are kept (not under "
                                "privacy.client_dp, where every round releases its noised sum).")
    fisher_floor: float = _f(1e-6, "Lower bound on each Fisher entry (keeps the merge defined where all Fishers vanish).")
    fisher_normalize: bool = _f(False, "Divide each client's Fisher by its mean before merging.")
    fisher_power: float = _f(
        1.0, "Fisher merging: weigh each client's entry by n_k F^p, a tempered Fisher (1: the paper's merge; 0: FedAvg's n_k; "
        "between: a softer preference for the client whose Fisher is larger)."
    )
    fisher_at: str = _f(
        "trained", "Where a Fisher pass (fednano, fednano-product, fednano-ffa) takes each client's Fisher: 'trained' (after local "
        "training, the paper's) or 'global' (at the global adapters it received, before training: every client's curvature at one "
        "point, so a client that fits its own data well does not lose weight for it)."
    )
    fisher_prior: float = _f(
        0.0, "Fisher merging of updates with the server's running Fisher (the mean merge weight of earlier rounds) as a prior: "
        "theta = theta_g + sum_k w_k Δ_k / (sum_k w_k + fisher_prior N F_prior); 0: none (the paper's merge)."
    )
    merge_diagnostics: bool = _f(
        False, "Record per round what the merge did (results.json `merge_diagnostics`, merge_diagnostics.png): each client's Fisher "
        "total and weight share, per tensor the entries one client dominates and the effective clients per entry, the A/B "
        "factor mismatch, each update's cosine to the merged one, and (at validation rounds) the Fisher's relative error "
        "against one from 4x the samples. Methods without a Fisher then compute one for the diagnostics (more client work and "
        "split bytes); NanoEdge methods with a global merge only."
    )
    max_update_norm: float = _f(0.0, "Reject a client update whose distance ||theta_k - theta_global|| exceeds this (0 = no bound).")
    client_cpus: float = _f(1.0, "CPUs Ray reserves per simulated client.")
    client_gpus: float = _f(
        0.0,
        "Share of a GPU Ray reserves per simulated client (e.g. 0.25: four clients share one GPU; 0: "
        "clients run on the CPU). Needs a CUDA GPU.",
    )
    round_timeout: float = _f(
        3600.0, "Seconds the server waits for replies in a round; clients that have not replied by then are dropped from it."
    )
    seed: int = _f(0, "Seed for adapter initialisation and client sampling.")

    def __post_init__(self) -> None:
        _check(
            self.strategy in methods(),
            "federation.strategy",
            f"unknown strategy {self.strategy!r}; choose one of {sorted(methods())}",
        )
        _check(self.rounds >= 1, "federation.rounds", "must be >= 1")
        _check(self.eval_every >= 1, "federation.eval_every", "must be >= 1")
        _check(0.0 < self.fraction_train <= 1.0, "federation.fraction_train", "must be in (0, 1]")
        _check(0.0 < self.fraction_evaluate <= 1.0, "federation.fraction_evaluate", "must be in (0, 1]")
        _check(self.min_train_clients >= 1, "federation.min_train_clients", "must be >= 1")
        _check(self.fisher_floor > 0, "federation.fisher_floor", "must be > 0")
        _check(self.max_update_norm >= 0, "federation.max_update_norm", "must be >= 0")
        _check(self.proximal_mu >= 0, "federation.proximal_mu", "must be >= 0")
        _check(
            self.fisher_type in ("empirical", "exact"),
            "federation.fisher_type",
            f"must be 'empirical' or 'exact', got {self.fisher_type!r}",
        )
        _check(self.fisher_power >= 0, "federation.fisher_power", "must be >= 0")
        _check(self.fisher_at in ("trained", "global"), "federation.fisher_at", f"must be 'trained' or 'global', got {self.fisher_at!r}")
        _check(self.fisher_prior >= 0, "federation.fisher_prior", "must be >= 0")
        _check(self.server_lr > 0, "federation.server_lr", "must be > 0")
        _check(0 <= self.server_beta1 < 1 and 0 <= self.server_beta2 < 1, "federation.server_beta1/2", "must be in [0, 1)")
        _check(self.server_tau > 0, "federation.server_tau", "must be > 0")
        _check(self.client_cpus > 0, "federation.client_cpus", "must be > 0")
        _check(
            self.client_gpus >= 0 and (self.client_gpus <= 1 or self.client_gpus.is_integer()),
            "federation.client_gpus",
            "must be a fraction in [0, 1] or a whole number of GPUs",
        )
        _check(self.round_timeout > 0, "federation.round_timeout", "must be > 0")


@dataclass
class SplitConfig:
    host: str = _f("127.0.0.1", "Address the split-learning server binds to.")
    port: int = _f(0, "Port of the split-learning server (0 = pick a free port).")
    advertised_address: str = _f("", "host:port clients dial (default: host:port as bound).")
    wire_dtype: str = _f(
        "bfloat16", "dtype of activations and gradients on the wire: 'bfloat16', 'float32', or one byte per value with one scale "
        "per tensor (lossy): 'float8_e4m3', 'float8_e5m2' or 'int8'."
    )
    protocol: str = _f(
        "cached-features+ids",
        "What crosses per step: 'activations' (the input embeddings up, their gradient down: the paper's split), "
        "'cached-features' (each image's frozen connector output once, then the text rows and NanoAdapter-I's weights up, "
        "their gradients down) or 'cached-features+ids' (token ids instead of text rows; only the adapters' gradients "
        "down; the fewest bytes, as fast as 'activations' on the default run). Same gradients in all three; the cached "
        "ones need adapter.dropout = 0.",
    )
    label_private: bool = _f(
        False, "The U-shaped split (with protocol = 'activations'): the answers never leave the client. The server returns the "
        "final hidden states at the positions that predict an answer token, the client applies the output head (its "
        "embedding table, for LLMs whose head is tied to it) and sends back d loss / d hidden states; two frames a step, the "
        "same gradients. A server that runs the known-head gradient attack still reads the labels (BENCHMARKS, docs/guides/privacy.md)."
    )
    feature_cache_mb: float = _f(
        4096.0, "Most image features (MiB) the split server keeps for the cached protocols; least recently used go first."
    )
    max_frame_mb: float = _f(64.0, "Largest frame (MiB) the split server accepts.")
    require_token: bool = _f(
        True,
        "Generate a secret per run; each client gets its own token (HMAC of its id) in its train message, "
        "and the split server refuses streams without a valid one.",
    )
    tls_cert: str = _f("", "PEM certificate (chain) of the split server; with tls_key, the channel uses TLS.")
    tls_key: str = _f("", "PEM private key of the split server.")
    tls_ca: str = _f("", "PEM CA certificate clients verify the split server with (sent to them in the train config).")
    max_streams: int = _f(64, "Most concurrent split streams the server accepts.")
    max_streams_per_client: int = _f(4, "Most concurrent split streams one client (token) may hold.")
    micro_batching: bool = _f(
        False,
        "Run the training steps of clients that arrive together as one LLM forward/backward (1.15-1.32x throughput with 2-8 "
        "clients). Off by default: with a bf16 LLM a step's rounding depends on which other steps share its batch, which "
        "depends on timing, so batched runs of one config differ from run to run (fp32: per client exactly as alone).",
    )
    max_batch_tokens: int = _f(
        4096,
        "With micro_batching: merge waiting steps while the merged batch holds at most this many "
        "(padded) tokens, rows x longest sequence; a step larger than this runs alone. On a GPU a 7B "
        "LLM saturates at about 8 x 640 tokens; a small LLM takes far more.",
    )
    batch_window_ms: float = _f(30.0, "With micro_batching: how long a step may wait for other connected clients' steps to join it.")
    max_score_cache_mb: float = _f(
        2048.0,
        "Most KV cache the server holds while scoring answer candidates: the prompts' cache is copied once per "
        "candidate, so beyond this candidates are scored a chunk at a time (same scores, less memory; at 7B, "
        "8 prompts x 13 candidates x 640 tokens would hold 35 GB).",
    )

    def __post_init__(self) -> None:
        _check(self.wire_dtype in WIRE_DTYPES, "split.wire_dtype", f"must be one of {list(WIRE_DTYPES)}")
        _check(self.protocol in SPLIT_PROTOCOLS, "split.protocol", f"must be one of {list(SPLIT_PROTOCOLS)}")
        _check(self.feature_cache_mb > 0, "split.feature_cache_mb", "must be > 0")
        _check(bool(self.tls_cert) == bool(self.tls_key) == bool(self.tls_ca), "split.tls_cert", "tls_cert, tls_key and tls_ca go together")
        _check(self.max_streams >= 1, "split.max_streams", "must be >= 1")
        _check(self.max_streams_per_client >= 1, "split.max_streams_per_client", "must be >= 1")
        _check(self.batch_window_ms >= 0, "split.batch_window_ms", "must be >= 0")
        _check(self.max_batch_tokens >= 1, "split.max_batch_tokens", "must be >= 1")
        _check(0 <= self.port < 65536, "split.port", "must be in [0, 65535]")
        _check(self.max_frame_mb > 0, "split.max_frame_mb", "must be > 0")
        _check(self.max_score_cache_mb > 0, "split.max_score_cache_mb", "must be > 0")


@dataclass
class PrivacyConfig:
    audit: bool = _f(
        False, "Measure, at round 0 and after every round, what an honest-but-curious server reads from the training frames the "
        "global adapters would produce (`fednano leakage`'s attacks: text tokens by nearest embedding row, answer tokens in the "
        "clear, images by top-1 retrieval) on audit_samples training samples of each client; results.json `leakage` per round, "
        "leakage.png. Simulation only (the server needs the clients' samples); NanoEdge methods with a global model."
    )
    audit_samples: int = _f(8, "privacy.audit: training samples per client the attacks run on (the same ones every round).")
    audit_pool: int = _f(200, "privacy.audit: candidate images the image attack retrieves among (the audited samples' own and others).")
    embedding_noise: float = _f(
        0.0, "Metric local DP for the text embeddings a client sends (split.protocol = 'activations'): noise with density "
        "∝ exp(-ε‖z‖) on every text position of every frame, its expected norm this multiple of the embedding table's median "
        "row norm (0: none). results.json `privacy` reports ε per unit distance and for a typical pair of tokens."
    )

    label_epsilon: float = _f(
        0.0, "Label DP by randomized response (0: off): each client trains on answers drawn once per sample from OS entropy and "
        "kept in its state folder (the same in every round, process and run on that node): the true one with probability "
        "e^ε / (e^ε + K − 1), else one of its other K − 1 candidate answers. "
        "Whatever the server reads from labels or gradients, each answer is ε-label-DP. Needs a closed answer set; not for "
        "centralized (it pools the data on the server)."
    )
    gradient_noise: float = _f(
        0.0, "With split.label_private: Gaussian noise on the d loss / d hidden states a client sends, each position's noise "
        "about this multiple of its gradient's norm (0: none), against the known-head label attack; measured in BENCHMARKS."
    )
    client_dp: bool = _f(
        False, "Client-level differential privacy on what is aggregated (DP-FedAvg): each client's update is clipped to L2 norm "
        "clip_norm, the server adds Gaussian noise of std noise_multiplier × clip_norm to their sum and divides by the expected "
        "number of clients per round, fraction_train × num_clients; every client weighs the same. Clients are Poisson-sampled "
        "(each independently with probability federation.fraction_train, as the accountant assumes), and every round releases "
        "its noised sum, even one with fewer than min_train_clients replies. (ε, δ) per round from Opacus's RDP accountant, in "
        "results.json. "
        "Central DP: it protects the clients from whoever sees the global model, not from the server. For the FedAvg family "
        "(fedavg, fedprox, fedadam, fedyogi, fedit-lora) and, with noise on both of its sums, Fisher merging (fednano, "
        "fednano-ef, fednano-ffa: see fisher_groups; the accountant sees noise_multiplier / sqrt(2))."
    )
    dp_sgd: bool = _f(
        False, "Sample-level differential privacy for the NanoAdapters (DP-SGD): every local step takes a Poisson sample of the "
        "client's data (expected size train.batch_size), clips each sample's adapter gradient to L2 norm clip_norm and adds "
        "Gaussian noise of std noise_multiplier × clip_norm to their sum. Each client's (ε, δ), from Opacus's RDP accountant over "
        "the steps it took, is in results.json. FedNano's Fisher then comes from these noised gradients (no extra privacy cost). "
        "NanoEdge methods; split.protocol = 'activations', adapter.dropout = 0."
    )
    clip_norm: float = _f(1.0, "privacy.client_dp: the L2 bound on one client's update (all its adapters together); privacy.dp_sgd: "
                          "on one sample's adapter gradient.")
    noise_multiplier: float = _f(1.0, "privacy.client_dp / dp_sgd: the noise's std over clip_norm (sigma); see target_epsilon.")
    target_epsilon: float = _f(
        0.0, "privacy.client_dp / dp_sgd: choose the noise multiplier (Opacus's search) so that federation.rounds rounds spend this "
        "epsilon at delta (0: use noise_multiplier). DP-SGD calibrates each client as if it trained every round, so the bound "
        "holds whichever rounds it is sampled in."
    )
    delta: float = _f(1e-5, "privacy.client_dp / dp_sgd: the delta of the reported (epsilon, delta).")
    fisher_groups: str = _f(
        "tensor", "privacy.client_dp with Fisher merging (fednano, fednano-ef, fednano-ffa): the groups each client's Fisher is "
        "summed over before it is noised: 'tensor' (one weight per adapter factor) or 'rank' (one per rank component: finer, "
        "noisier). Per-entry weights would drown in the noise."
    )
    reproducible_noise: bool = _f(
        False, "For tests only: seed every privacy draw (DP-FedAvg's and DP-SGD's noise, embedding and gradient noise, randomized "
        "answers, client sampling under client_dp) from federation.seed, data.seed, the round and the partition, so runs repeat. "
        "Anyone who knows the config can then recompute the noise and subtract it: results.json `privacy` and the log mark the run "
        "not private. false (the default): every draw comes from OS entropy, seeds kept only where they are drawn."
    )

    def __post_init__(self) -> None:
        _check(self.embedding_noise >= 0, "privacy.embedding_noise", "must be >= 0")
        _check(self.gradient_noise >= 0, "privacy.gradient_noise", "must be >= 0")
        _check(self.label_epsilon >= 0, "privacy.label_epsilon", "must be >= 0 (0: off)")
        _check(self.clip_norm > 0, "privacy.clip_norm", "must be > 0")
        _check(self.noise_multiplier >= 0, "privacy.noise_multiplier", "must be >= 0")
        _check(0 < self.delta < 1, "privacy.delta", "must be in (0, 1)")
        _check(self.fisher_groups in ("tensor", "rank"), "privacy.fisher_groups", f"must be 'tensor' or 'rank', not {self.fisher_groups!r}")
        _check(self.target_epsilon >= 0, "privacy.target_epsilon", "must be >= 0 (0: use privacy.noise_multiplier)")
        _check(not (self.dp_sgd and self.client_dp), "privacy.dp_sgd",
               "sample-level DP-SGD and client-level DP-FedAvg together are not supported; choose one (privacy.client_dp = false)")
        _check(self.target_epsilon == 0 or self.dp_sgd or self.client_dp, "privacy.target_epsilon",
               "sets the noise of privacy.client_dp or privacy.dp_sgd; turn one of them on")
        _check(self.audit_samples >= 1, "privacy.audit_samples", "must be >= 1")
        _check(self.audit_pool >= 1, "privacy.audit_pool", "must be >= 1")
        _check(not self.reproducible_noise or bool(self.client_dp or self.dp_sgd or self.embedding_noise or self.gradient_noise
                                                    or self.label_epsilon), "privacy.reproducible_noise",
               "seeds the privacy noise of client_dp, dp_sgd, embedding_noise, gradient_noise or label_epsilon; turn one of them on")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        _check(
            self.data.server_test or self.data.on_nodes,
            "data.server_test",
            "false means the server holds no data and scores with the clients' own test splits, which needs data.on_nodes "
            "(in simulation the server holds the data it partitions: keep data.server_test = true)",
        )
        _check(
            not (self.privacy.audit and self.data.on_nodes),
            "privacy.audit",
            "the audit attacks the clients' own training samples, which a server whose nodes keep their data never has: simulation only",
        )
        _check(
            self.privacy.gradient_noise == 0 or self.split.label_private,
            "privacy.gradient_noise",
            "noise on the hidden states' gradient needs split.label_private = true (only that split sends it)",
        )
        _check(
            self.data.server_test or self.data.validation_samples == 0,
            "data.validation_samples",
            "the server scores the validation set, and with data.server_test = false it holds no data: set it to 0",
        )
        PROTOCOLS[self.split.protocol].check(self)  # what the protocol cannot honour (split/protocols.py)
        methods()[self.federation.strategy].check(self)  # what the method cannot honour (methods/registry.py)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_toml(self) -> str:
        return dump_toml(self.to_dict())


def _check(ok: bool, name: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {msg}")


def from_dict(data: dict[str, Any], source: str = "<dict>") -> RunConfig:
    """Build a validated RunConfig; unknown tables/keys and bad values name `source`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a table of sections")
    sections = {f.name: f.type for f in dataclasses.fields(RunConfig)}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name not in sections:
            raise ConfigError(f"{source}: unknown section [{name}]; known: {sorted(sections)}")
        cls = _SECTION_CLASSES[name]
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key, v in value.items():
            if key not in known:
                raise ConfigError(f"{source}: unknown field {name}.{key}; known: {sorted(known)}")
            expected = type(known[key].default)
            if expected is float and isinstance(v, int) and not isinstance(v, bool):
                value[key] = float(v)
            elif not isinstance(v, expected) or (expected is int and isinstance(v, bool)):
                raise ConfigError(f"{source}: {name}.{key} must be {expected.__name__}, got {type(v).__name__} {v!r}")
        try:
            kwargs[name] = cls(**value)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    try:
        return RunConfig(**kwargs)
    except ConfigError as e:  # a check across sections
        raise ConfigError(f"{source}: {e}") from None


def same_config(recorded: Any, cfg: RunConfig) -> bool:
    """Whether a run recorded with `recorded` (a RunConfig.to_dict() from results.json) was made
    with `cfg`. Fields added to FedNano since then count as their defaults, so a newer version
    can still resume or skip an older run whose settings it would reproduce."""
    try:
        return from_dict(json.loads(json.dumps(recorded)), "recorded config").to_dict() == cfg.to_dict()
    except ConfigError:
        return False


def read_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file is a ConfigError naming it."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load a TOML config (or the defaults when `path` is None) and apply dotted overrides."""
    data: dict[str, Any] = read_toml(path) if path is not None else {}
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        data.setdefault(section, {})[key] = value
    return from_dict(data, str(path) if path is not None else "<defaults>")


_SECTION_CLASSES: dict[str, type] = {
    "model": ModelConfig,
    "adapter": AdapterConfig,
    "prepare": PrepareConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "federation": FederationConfig,
    "split": SplitConfig,
    "privacy": PrivacyConfig,
}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(v)


def dump_toml(data: dict[str, Any], with_help: bool = False) -> str:
    """Write the config as TOML (optionally with each field's help as a comment)."""
    lines: list[str] = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(_SECTION_CLASSES[section])}
        for key, v in values.items():
            if with_help and helps.get(key):
                lines.append(f"# {helps[key]}")
            lines.append(f"{key} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)


def options_help() -> str:
    """Every option with its default and help, for `--help` and the docs."""
    out = []
    for section, cls in _SECTION_CLASSES.items():
        for f in dataclasses.fields(cls):
            out.append(f"{section}.{f.name} (default {f.default!r}): {f.metadata['help']}")
    return "\n".join(out)


# What a node may set for itself in its node config (`flower-supernode --node-config "batch-size=2 device='cuda'"`),
# over the server's run config: key -> (section, field, type). A small device and a large one can then share a federation.
NODE_SETTINGS: dict[str, tuple[str, str, type]] = {
    "batch-size": ("train", "batch_size", int),
    "eval-batch-size": ("train", "eval_batch_size", int),
    "device": ("model", "client_device", str),
    "threads": ("federation", "client_cpus", float),
    "image-folder": ("data", "image_folder", str),
    "cache-dir": ("model", "cache_dir", str),  # where the node keeps the client bundles it received, and its partition
    # data.on_nodes: the node's own data
    "dataset": ("data", "dataset", str),
    keys.DATA_PATH: ("data", "path", str),
    "test-path": ("data", "test_path", str),
}

_KIND_NAMES = {int: "an integer", float: "a number", str: "a string"}


def with_node_settings(cfg: RunConfig, node_config: dict[str, Any], node: str = "this node") -> RunConfig:
    """`cfg` with the node's own settings (NODE_SETTINGS) applied; other node-config keys are not settings
    (partition-id, state-dir, ...). A bad value is a ConfigError naming the node and the key."""
    changes: dict[str, dict[str, Any]] = {}
    for key, (section, name, kind) in NODE_SETTINGS.items():
        if key not in node_config:
            continue
        value = node_config[key]
        ok = isinstance(value, str) if kind is str else isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or (kind is int and float(value) != int(value)):
            raise ConfigError(f"{node}: node config {key}={value!r} must be {_KIND_NAMES[kind]}")
        changes.setdefault(section, {})[name] = kind(value)
    if not changes:
        return cfg
    data = cfg.to_dict()
    for section, fields in changes.items():
        data[section].update(fields)
    try:
        return from_dict(data, f"{node}'s node config")
    except ConfigError as e:
        raise ConfigError(f"{node}: node config: {e}") from None
