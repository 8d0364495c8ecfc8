"""The client side: everything a NanoEdge holds and computes, in the order data flows.

vision.py, hf_vision.py  frozen vision encoders: images -> features
connector.py             the frozen connector: features -> the LLM's embedding space
adapters.py              NanoAdapter-I / NanoAdapter-T, the only trainable parameters
nanoedge.py              NanoEdge: encoder + connector + embedding table + adapters -> input embeddings
features.py              the image-feature cache and token batches
training.py              the split step and local training (gradients come back through the split)
evaluation.py            closed-set answer scoring
fisher.py                the diagonal Fisher that the server merges with (and per-sample adapter gradients)
dp_sgd.py                sample-level DP-SGD: Poisson batches, per-sample clipping, Gaussian noise
"""
