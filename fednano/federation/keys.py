"""Record and config keys shared by the ServerApp and the ClientApp (kebab-case, as Flower's)."""

ARRAYS = "arrays"  # ArrayRecord: NanoAdapter parameters
FISHER = "fisher"  # ArrayRecord: diagonal Fisher of the same parameters
METRICS = "metrics"
CONFIG = "config"

RUN_CONFIG = "run-config"  # the full RunConfig as JSON
SPLIT_ADDRESS = "split-address"
SERVER_ROUND = "server-round"
WANT_FISHER = "want-fisher"

NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"
TRAIN_LOSS = "train-loss"
ACCURACY = "accuracy"
SECONDS = "seconds"
# split-channel bytes this reply's work moved (client-side count)
BYTES_KEYS = ("activations_up", "gradients_down", "eval_activations_up", "eval_scores_down")
