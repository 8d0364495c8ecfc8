"""Free-form answers from an exported composed model (smol / compose): plain transformers for the
LLM, FedNano's NanoEdge loader for the vision side, greedy decoding.

    fednano export results/latest --output results/export
    python examples/answer_from_export.py results/export [--n 12]

Prints each easy-vqa test question, the generated answer and the truth, and the exact-match count.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fednano.backbones.bundle import load_nanoedge
from fednano.client.features import ImageFeatures
from fednano.config import AdapterConfig
from fednano.data.easyvqa import SYSTEM_PROMPT, load_split
from fednano.data.prompts import prompt_batch

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("export", help="a folder written by `fednano export` from a smol / compose run")
ap.add_argument("--n", type=int, default=12, help="how many easy-vqa test questions (the first n)")
args = ap.parse_args()

lm = AutoModelForCausalLM.from_pretrained(f"{args.export}/llm", dtype=torch.bfloat16).eval()
tok = AutoTokenizer.from_pretrained(f"{args.export}/llm")
vision = load_nanoedge(f"{args.export}/vision", AdapterConfig())  # the adapters are folded in; fresh ones are the identity
edge = vision.edge
right = 0
samples = list(load_split("test"))[: args.n]
for s in samples:
    batch = prompt_batch(vision.tokenizer, [s.content()], edge.num_visual_tokens, SYSTEM_PROMPT)
    with torch.no_grad():
        x = edge.embed(batch.input_ids, ImageFeatures(edge.vision)([s.image_path])).to(lm.dtype)
        ids = lm.generate(inputs_embeds=x, attention_mask=batch.attention_mask, max_new_tokens=6, do_sample=False)
    answer = tok.decode(ids[0], skip_special_tokens=True).strip()
    right += answer.lower().rstrip(".") == s.answer.lower()
    print(f"{s.question:45} -> {answer:10} (truth: {s.answer})")
print(f"{right}/{len(samples)} exact matches")
