"""The split-learning channel: client NanoEdge <-> server LLM over gRPC.

endpoint.py  what the client computes against (ServerLLM's `train_step` / `score` / `generate`)
frames.py    the wire format (raw tensor bytes + a small JSON header) and its checks
protocols.py the protocols (split.protocol), one entry each: their byte formulas and config checks (torch-free)
parts.py     what each protocol sends, computed from the NanoEdge (EdgeParts), and the adapters' closed-form maths
assembly.py  the server's side of the cached protocols: the image-feature cache, parts -> embeddings
server.py    the gRPC service wrapping a ServerLLM (one LLM thread, micro-batches)
client.py    the client stub, with the same `train_step` / `score` / `generate` calls as ServerLLM
"""
