"""Building MLLMs and splitting them into what a client may hold and what stays on the server.

registry.py   BACKBONES: one entry per backbone (its checks, prepare, layouts, loading, export, footprint)
idefics3.py   the Idefics3 (SmolVLM) family, a backbone in one file
bundle.py     prepared bundles on disk (client/ + server.json); loading each side, on its device
prepare.py    `fednano prepare`: assemble (and pre-train a connector) or split a checkpoint, cached
tiny.py       tiny random models from config (tests, the `tiny` backbone)
footprint.py  parameters per side and bytes per step, from real configurations on the meta device
footprints/   LLaVA-1.5-7B's and MiniGPT-4's configurations
"""
