"""Candidate scoring with a shared prompt pass + KV cache equals brute-force full sequences."""

import torch

from fednano.client.features import ImageFeatures
from fednano.data.easyvqa import SYSTEM_PROMPT, answer_set, load_split
from fednano.data.prompts import answer_ids, candidate_batch, prompt_batch


def _prompts_and_candidates(tiny_edge):
    """3 easy-vqa prompts and the 13 answers, embedded by the tiny NanoEdge."""
    edge, tok = tiny_edge.edge, tiny_edge.tokenizer
    samples = list(load_split("test")[:3])
    with torch.no_grad():
        batch = prompt_batch(tok, [s.content() for s in samples], edge.num_visual_tokens, SYSTEM_PROMPT)
        embeds = edge.embed(batch.input_ids, ImageFeatures(edge.vision)([s.image_path for s in samples]))
        cand = candidate_batch(tok, answer_set())
        return batch, embeds, cand, edge.embed(cand.input_ids, None)


def test_score_equals_brute_force_log_likelihood(tiny_edge, tiny_llm):
    edge, tok = tiny_edge.edge, tiny_edge.tokenizer
    answers = answer_set()
    batch, embeds, cand, cand_embeds = _prompts_and_candidates(tiny_edge)
    with torch.no_grad():
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


def test_scoring_in_chunks_of_candidates_gives_the_same_scores_within_the_cache_budget(tiny_edge, tiny_llm):
    """A cache budget scores the candidates a chunk at a time (the last chunk smaller): same scores."""
    from fednano.server.llm import cache_bytes, candidates_per_pass

    batch, embeds, cand, cand_embeds = _prompts_and_candidates(tiny_edge)
    answers = answer_set()
    args = (embeds, batch.attention_mask, cand_embeds, cand.input_ids, cand.attention_mask)
    with torch.no_grad():
        whole = tiny_llm.score(*args)
        out = tiny_llm.decoder(inputs_embeds=embeds, attention_mask=batch.attention_mask, use_cache=True)
    B, T = batch.attention_mask.shape
    per_token = cache_bytes(out.past_key_values) // (B * T)
    cfg = tiny_llm.model.config
    assert per_token == cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    L, K = cand.input_ids.shape[1], len(answers)
    for chunk in (1, 5, K):
        budget = B * chunk * (T + L) * per_token
        assert candidates_per_pass(per_token, B, T + L, K, budget) == chunk
        with torch.no_grad():
            got = tiny_llm.score(*args, max_cache_bytes=budget)
        torch.testing.assert_close(got, whole, rtol=0, atol=1e-5)
    assert candidates_per_pass(per_token, B, T + L, K, 1) == 1  # at least one candidate per pass
