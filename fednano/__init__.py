"""FedNano: federated tuning of multimodal LLMs with the LLM kept on the server.

The packages, in the order data flows through them:
    data/         samples of every dataset, prompts and token batches, non-IID partitions
    client/       the NanoEdge: frozen encoder -> frozen connector -> NanoAdapters (+ embedding table);
                  local training, answer scoring, and the diagonal Fisher
    split/        the wire: frames, the gRPC service (one LLM thread, micro-batches) and the client stub
    server/       the frozen LLM: loss and d loss / d embeddings, answer scoring
    backbones/    MLLMs assembled or split into a client bundle and a server part; parameter accounting
    runtime/      what a client process and the server process hold for a run
    methods/      every federated method as one registry entry of behaviour objects
    aggregation.py  the merge maths (Fisher merging, FedAvg, FedOpt), pure functions
    federation/   Flower's ServerApp / ClientApp / strategy / simulation: the only code importing flwr
    experiments/  results folders, sweeps and reports
    export.py     the tuned MLLM as a standard checkpoint, NanoAdapters folded into its weights
    generate.py   free-form answers from a tuned run
Beside them: config.py (the run config), errors.py (UserError: what the user can fix), devices.py
(devices, dtypes, memory), io.py (atomic writes), metrics.py, progress.py, cli.py.
"""

__version__ = "0.1.0"
