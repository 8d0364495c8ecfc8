"""Free-form answers from an exported smol / compose run with transformers alone: no FedNano needed.

    fednano export results/latest --output results/export
    python examples/answer_from_export.py results/export questions.json [--n 12] [--image-folder DIR]

questions.json is LLaVA conversation JSON (images relative to --image-folder, default the file's folder):

    [{"id": "q1", "image": "shape.png",
      "conversations": [{"from": "human", "value": "<image>\\nwhat is the red shape?"}, {"from": "gpt", "value": "triangle"}]}]

Prints each question, the generated answer and the reference answer, and the exact-match count. The
export's folder carries the model's code (trust_remote_code); this script imports torch, transformers and PIL only.
"""

import argparse
import json
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("export", help="a folder written by `fednano export` from a smol / compose run")
ap.add_argument("data", type=Path, help="a LLaVA-JSON file of questions (the first human / gpt turns are used)")
ap.add_argument("--image-folder", type=Path, help="where the images are (default: the JSON file's folder)")
ap.add_argument("--n", type=int, default=12, help="how many questions (the first n)")
ap.add_argument("--max-new-tokens", type=int, default=16)
args = ap.parse_args()

model = AutoModelForImageTextToText.from_pretrained(args.export, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(args.export, trust_remote_code=True)
folder = args.image_folder or args.data.parent
right = 0
records = json.loads(args.data.read_text())[: args.n]
for rec in records:
    question, truth = rec["conversations"][0]["value"].strip(), rec["conversations"][1]["value"].strip()
    images = [Image.open(folder / rec["image"])] if rec.get("image") else []
    if images and "<image>" not in question:
        question = "<image>\n" + question  # as FedNano reads LLaVA-JSON: the image before the question
    messages = [{"role": "system", "content": processor.system_prompt}, {"role": "user", "content": question}]
    prompt = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(images=images or None, text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    right += answer.lower().rstrip(".") == truth.lower().rstrip(".")
    print(f"{question.replace('<image>', '').strip():45} -> {answer:10} (truth: {truth})")
print(f"{right}/{len(records)} exact matches")
