"""Tiny random models built from config, in the layouts real checkpoints use.

Used by the `tiny` backbone and by the tests, the way transformers tests its
own models: real code paths, hidden size 32, two layers, no downloads. The
tokenizer is word-level over easy-vqa's vocabulary.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
HIDDEN = 32


def tiny_words() -> list[str]:
    from fednano.data.easyvqa import SYSTEM_PROMPT, vocabulary_words

    extra = " ".join([
        SYSTEM_PROMPT, "Describe the image in a few words. What is in the image?", "system user assistant a USER ASSISTANT :",
        "a b c d e f g h i j 0 1 2 3 4 5 6 7 8 9 context options answer with the option's letter from given choices directly",
    ])
    return vocabulary_words() + re.findall(r"\w+|[^\w\s]+", extra.lower())


def tiny_tokenizer(chat_template: bool = True, extra_specials: tuple[str, ...] = (), words: list[str] | None = None) -> Any:
    """A word-level tokenizer over `words` (default tiny_words(), which reads easy-vqa: a machine without the package,
    such as the GPU machine of benchmarks/gpu_checks.py, passes the words of its own data)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>", *extra_specials]
    vocab = {t: i for i, t in enumerate(specials)}
    for w in sorted(set(tiny_words() if words is None else words)):
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>",
        bos_token="<|im_start|>", additional_special_tokens=specials[1:3] + list(extra_specials),
    )
    if chat_template:
        tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_llama_config(tok: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
    )


def build_tiny_llm(out_dir: Path, seed: int = 0) -> Path:
    """A tiny random Llama causal LM + tokenizer with a ChatML template."""
    from transformers import LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_llama_config(tok)).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def tiny_llava_config(tok: Any, image_size: int = 32, patch_size: int = 8) -> Any:
    """LLaVA's configuration at tiny sizes: a CLIP tower and a Llama LM."""
    from transformers import CLIPVisionConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image_size, patch_size=patch_size, projection_dim=HIDDEN)
    return LlavaConfig(vision_config=vision, text_config=tiny_llama_config(tok), image_token_index=tok.convert_tokens_to_ids("<image>"),
                       image_seq_length=(image_size // patch_size) ** 2)


def build_tiny_llava(out_dir: Path, seed: int = 0, image_size: int = 32, patch_size: int = 8) -> Path:
    """A tiny random LlavaForConditionalGeneration checkpoint (CLIP tower + Llama), no chat template."""
    from transformers import LlavaForConditionalGeneration

    tok = tiny_tokenizer(chat_template=False, extra_specials=("<image>",))
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(tiny_llava_config(tok, image_size, patch_size)).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def build_tiny_blip2(out_dir: Path, seed: int = 0, image_size: int = 32, patch_size: int = 8, queries: int = 4) -> Path:
    """A tiny random Blip2ForConditionalGeneration checkpoint with a decoder-only Llama LM."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig

    tok = tiny_tokenizer(chat_template=False, extra_specials=("<image>",))
    vision = Blip2VisionConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=image_size, patch_size=patch_size)
    qformer = Blip2QFormerConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 encoder_hidden_size=HIDDEN, cross_attention_frequency=1, vocab_size=len(tok))
    cfg = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=tiny_llama_config(tok).to_dict(),
                      num_query_tokens=queries, image_token_index=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(cfg)
    with torch.no_grad():  # HF initialises the queries to zero; give them signal like a trained model
        model.query_tokens.normal_(0, 0.5)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
