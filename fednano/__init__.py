"""FedNano: federated tuning of multimodal LLMs with the LLM kept on the server.

Data flow (one package per stage):
    data/        easy-vqa samples, prompts, non-IID partitions
    models/      client side (vision encoder, connector, NanoAdapters = NanoEdge)
                 and server side (frozen LLM step: loss and d loss / d embeddings)
    split/       the gRPC split-learning channel between the two
    fisher.py    diagonal Fisher of the adapter parameters
    aggregation.py  pure merge functions (Fisher merging, FedAvg)
    federation/  Flower ServerApp / ClientApp (the only code importing flwr)
"""

__version__ = "0.1.0"
