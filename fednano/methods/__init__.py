"""The federated methods, as objects: `registry.METHODS` (one entry per method) and their parts.

registry.py        the table, and Method: a client's round and evaluation from its parts
nanoadapters.py    what FedNano's family trains (the NanoAdapters, through the split)
whole_llm.py       what the comparison family trains (LoRA inside a whole LLM on the client)
fisher_sources.py  what a client sends besides its weights (no Fisher, an extra pass, its training)
combiners.py       how the server merges replies, and what it remembers across rounds
topologies.py      who trains on what, what each node is sent, and how it is evaluated
"""
