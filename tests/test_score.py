"""Candidate scoring with a shared prompt pass + KV cache equals brute-force full sequences."""

import torch

from fednano.client.features import ImageFeatures
from fednano.data.easyvqa import SYSTEM_PROMPT, answer_set, load_split
from fednano.data.prompts import answer_ids, candidate_batch, prompt_batch


def test_score_equals_brute_force_log_likelihood(tiny_edge, tiny_llm):
    edge, tok = tiny_edge.edge, tiny_edge.tokenizer
    samples = list(load_split("test")[:3])
    answers = answer_set()
    feats = ImageFeatures(edge.vision)([s.image_path for s in samples])
    with torch.no_grad():
        batch = prompt_batch(tok, [s.content() for s in samples], edge.num_visual_tokens, SYSTEM_PROMPT)
        embeds = edge.embed(batch.input_ids, feats)
        cand = candidate_batch(tok, answers)
        cand_embeds = edge.embed(cand.input_ids, None)
        got = tiny_llm.score(embeds, batch.attention_mask, cand_embeds, cand.input_ids, cand.attention_mask)
        assert got.shape == (3, len(answers))
        for i in range(3):
            n = int(batch.attention_mask[i].sum())
            for k, a in enumerate(answers):
                ids = answer_ids(tok, a)
                x = torch.cat([embeds[i, :n], edge.embed(torch.tensor([ids]), None)[0]]).unsqueeze(0)
                logits = tiny_llm.model(inputs_embeds=x).logits[0].float()
                lp = torch.log_softmax(logits, -1)
                ref = sum(lp[n - 1 + j, t] for j, t in enumerate(ids))
                assert abs(got[i, k].item() - ref.item()) < 1e-4, (i, a)
