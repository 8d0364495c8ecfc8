"""Record and config keys shared by the ServerApp and the ClientApp (kebab-case, as Flower's), and
the one way a number is read back from a record."""

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
PHASE_PREFIX = "seconds-"  # + start (a fresh process's age), build (NanoEdge, channel), data (load, check), work
PEAK_GPU_BYTES = "peak-gpu-bytes"  # CUDA clients: peak memory allocated during the message's work
PEAK_RSS_BYTES = "peak-rss-bytes"  # the client process's peak resident host memory so far
FISHER_REL_ERROR = "fisher-rel-error"  # federation.merge_diagnostics: the Fisher's relative error against 4x the samples
# split-channel bytes this reply's work moved (client-side count)
BYTES_KEYS = ("activations_up", "gradients_down", "eval_activations_up", "eval_scores_down", "eval_generate_up", "eval_answers_down",
              "features_up", "features_down")
