"""The split-learning channel: client NanoEdge <-> server LLM over gRPC.

frames.py  the wire format (raw tensor bytes + a small JSON header) and its checks
server.py  the gRPC service wrapping a ServerLLM
client.py  the client stub, with the same `train_step` / `score` calls as ServerLLM
"""
