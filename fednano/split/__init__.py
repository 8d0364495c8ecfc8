"""The split-learning channel: client NanoEdge <-> server LLM over gRPC.

endpoint.py  what the client computes against (ServerLLM's `train_step` / `score`)
frames.py    the wire format (raw tensor bytes + a small JSON header) and its checks
server.py    the gRPC service wrapping a ServerLLM (one LLM thread, micro-batches)
client.py    the client stub, with the same `train_step` / `score` calls as ServerLLM
"""
