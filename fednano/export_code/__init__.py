"""The code an exported composed model (`smol`, `compose`, `tiny`) carries in its folder.

`fednano export` copies these files next to the weights and names them in `auto_map` (config.json,
preprocessor_config.json, processor_config.json), Hugging Face's remote-code convention, so that
`AutoModelForImageTextToText` / `AutoModelForCausalLM` and `AutoProcessor` with `trust_remote_code=True`
load the tuned MLLM without FedNano. They import only torch, transformers, numpy and PIL, and each
other relatively: never `fednano`.
"""

FILES = ("configuration_fednano.py", "modeling_fednano.py", "image_processing_fednano.py", "processing_fednano.py")
