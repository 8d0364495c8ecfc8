"""Record and config keys shared by the ServerApp and the ClientApp (kebab-case, as Flower's), and
the one way a number is read back from a record. Every key a message, Flower's run config or a node config
carries is spelled here once; code outside the federation layer (a method's extra metrics) uses these names
too, so a key never changes spelling on its way. This module imports nothing of Flower."""

from typing import Any


def number(value: Any) -> float:
    """A record value that must be a number (a reply's metrics, a message's round)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {type(value).__name__} {value!r}")
    return float(value)


ARRAYS = "arrays"  # ArrayRecord: NanoAdapter parameters
FISHER = "fisher"  # ArrayRecord: diagonal Fisher of the same parameters
METRICS = "metrics"
CONFIG = "config"
CLIENT_INFO = "client-info"  # ConfigRecord: the device the client computed on (describe())
DATA_INFO = "data-info"  # ConfigRecord: what the client holds, in numbers (train, test, labels: a JSON histogram)

RUN_CONFIG = "run-config"  # the full RunConfig as JSON
SPLIT_ADDRESS = "split-address"
SPLIT_TOKEN = "split-token"  # per-run secret; travels inside Flower's (TLS) channel
SPLIT_CA = "split-ca"  # PEM of the CA that signed the split server's certificate ("" = plaintext)
SERVER_ROUND = "server-round"
BUNDLE_DIGEST = "bundle-digest"  # sha256 of the client bundle's manifest: the NanoEdge every node must hold (backbones/digest.py)
CLIENT_STATE_DIR = "client-state-dir"  # simulation: where clients keep what never leaves them (FedDPA-F's local LoRA)

NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"  # node config: must equal the run's data.num_clients when a node sets it
FETCH_BUNDLE = "fetch-bundle"  # node config: 0 = never fetch the client bundle from the server (it must be unpacked here)
TRAIN_LOSS = "train-loss"
ACCURACY = "accuracy"
SECONDS = "seconds"
PHASE_PREFIX = "seconds-"  # + start (a fresh process's age), relay (to the warm worker), build (NanoEdge, channel), data, work
PEAK_GPU_BYTES = "peak-gpu-bytes"  # CUDA clients: peak memory allocated during the message's work
PEAK_RSS_BYTES = "peak-rss-bytes"  # the client process's peak resident host memory so far
FISHER_REL_ERROR = "fisher-rel-error"  # federation.merge_diagnostics: the Fisher's relative error against 4x the samples
DP_SGD_SIGMA = "dp-sgd-sigma"  # privacy.dp_sgd: the noise multiplier the client trained with (its ledger: privacy.dp_sgd_ledger)
DP_SGD_RATE = "dp-sgd-rate"  # privacy.dp_sgd: its sampling rate (batch / local samples)
DP_SGD_STEPS = "dp-sgd-steps"  # privacy.dp_sgd: its noised steps this round
LOCAL_TRAIN_LOSS = "local-train-loss"  # feddpa-f: the personal LoRA's training loss

# Flower's run config (pyproject.toml [tool.flwr.app.config]; `fednano deploy-run` sets them)
CONFIG_FILE = "config-file"
OUTPUT_DIR = "output-dir"
# node config (besides config.NODE_SETTINGS, which maps node settings such as data-path onto the run config)
STATE_DIR = "state-dir"  # where a node keeps what never leaves it (FedDPA-F's personal LoRA, DP-SGD's noise seeds)
DATA_PATH = "data-path"  # data.on_nodes: the node's own data (a NODE_SETTINGS key)
WARM_WORKER = "warm-worker"  # 1: hand messages to the node's long-lived worker (node_worker.py; default in flwr-clientapp)
WORKER_IDLE = "worker-idle"  # seconds a warm worker waits for a message before it exits (default 1800)
# the node-config keys that are not settings of the run config (those are config.NODE_SETTINGS), for the reference
NODE_KEYS = {
    PARTITION_ID: "which partition the node holds: unique, 0 .. data.num_clients - 1 (with data.on_nodes it only names the node)",
    NUM_PARTITIONS: "when given, must equal the run's data.num_clients",
    STATE_DIR: "where the node keeps what never leaves it (FedDPA-F's personal LoRA, label DP's randomized answers) and its "
               "warm worker's log",
    FETCH_BUNDLE: "0: never fetch the client bundle from the split server (it must be unpacked on the node)",
    WARM_WORKER: "1 (the default under a SuperNode): hand train and evaluate messages to the node's long-lived worker, which "
                 "keeps the NanoEdge between messages; 0: do each one in Flower's fresh ClientApp process",
    WORKER_IDLE: "seconds the warm worker waits for a message before it exits (default 1800)",
}
# split-channel bytes this reply's work moved (client-side count)
BYTES_KEYS = ("activations_up", "gradients_down", "eval_activations_up", "eval_scores_down", "eval_generate_up", "eval_answers_down",
              "features_up", "features_down", "bundle_down")  # bundle_down: the NanoEdge, when the message's node fetched it
