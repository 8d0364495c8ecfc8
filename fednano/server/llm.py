"""The server side: a frozen causal LLM exposing one split-learning step.

Given input embeddings, an attention mask and labels, `train_step` returns the
loss and d loss / d embeddings; the LLM's own parameters never get gradients.
Logits are computed only at positions that carry a label: for a small LLM the
full-vocabulary head over every position is a large share of the work.
`score` returns the log-likelihood of each candidate continuation (closed-set
answer scoring), sharing one prompt pass across candidates via the KV cache.

Device-aware: the LLM may live on a GPU, or be sharded over several by
accelerate (`device_map`); requests arrive as CPU tensors decoded from the wire
and are moved to the device of the LLM's first layer; every tensor the step
makes is made where it is used, and the results stay there until the wire
format moves them back to the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.nn.functional as F

from fednano.data.prompts import IGNORE_INDEX
from fednano.devices import module_device
from fednano.split.endpoint import GREEDY, Decoding


class ServerLLM:
    """A frozen decoder stack + output head.

    `decoder(inputs_embeds=, attention_mask=, ...)` returns `last_hidden_state`
    (after the final norm); `head` maps hidden states to vocabulary logits.
    `model` is the module that owns both (kept for tests and parameter counts).
    """

    def __init__(self, model: Any, dtype: torch.dtype = torch.bfloat16, decoder: Any = None, head: Any = None) -> None:
        """`model`: a transformers PreTrainedModel as loaded (bundle.load_server_llm loads it straight into `dtype` on its device(s)).
        Parameters in another dtype are cast in place; buffers keep theirs, as from_pretrained(dtype=)
        leaves them (a Llama's rotary frequencies stay float32: rounding them to bf16 shifts its hidden
        states by several per cent)."""
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.dtype = dtype
        self.decoder = decoder if decoder is not None else model.get_decoder()
        self.head = head if head is not None else model.get_output_embeddings()
        self.device = module_device(self.decoder)  # where inputs go (the first shard of a sharded LLM)
        text_cfg = model.config.get_text_config()
        self.hidden_size = text_cfg.hidden_size
        self.vocab_size = text_cfg.vocab_size
        self.train_decoder = self.decoder  # what the training steps run (compile_training: the decoder under torch.compile)

    def set_attention(self, kind: str) -> None:
        """The attention kernel ('sdpa' or 'eager', config.ATTENTION) every layer uses from now on."""
        self.model.set_attn_implementation(kind)

    def compile_training(self) -> None:
        """Run the training steps (train_steps, the label-private split's hidden states and their backward) through the
        decoder under torch.compile (inductor, dynamic shapes, as a batch's length and the number of micro-batched
        requests vary). The first step compiles (1 to 3 minutes on a 2-core CPU); scoring and generation stay eager
        (their KV cache changes shape every token). Call after set_attention: the compiled graph keeps the kernel."""
        self.train_decoder = torch.compile(self.decoder, dynamic=True)

    def hidden_states(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The final hidden states (after the last norm) at `positions` (B, T) bool, as (N, d) in embeds' dtype, no graph:
        what the server returns in the label-private (U-shaped) split, where the client applies the output head itself."""
        with torch.no_grad():
            return self._hidden_at(embeds, mask, positions, grad=False)[0].to(embeds.dtype)

    def hidden_backward(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, grad_hidden: torch.Tensor) -> torch.Tensor:
        """d <hidden[positions], grad_hidden> / d embeds, (B, T, d) in embeds' dtype: the client's loss gradient w.r.t. the
        hidden states it was sent, back through the LLM. The forward is recomputed: the server keeps nothing between frames."""
        hidden, x = self._hidden_at(embeds, mask, positions, grad=True)
        (grad,) = torch.autograd.grad(hidden, x, grad_outputs=grad_hidden.to(hidden.device, hidden.dtype))
        return grad.to(embeds.dtype)

    def _hidden_at(
        self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = embeds.detach().to(self.device, self.dtype).requires_grad_(grad)
        hidden = self.train_decoder(inputs_embeds=x, attention_mask=mask.to(self.device)).last_hidden_state
        return hidden[positions.to(hidden.device)], x

    def train_step(
        self, embeds: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, reduction: str = "mean", parts: object = None
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """-> (loss, d loss / d embeds with embeds' dtype, number of label tokens).

        reduction="mean": mean NLL over label tokens (training).
        reduction="sum": summed NLL; its gradient w.r.t. sample i's embeddings is
        the gradient of sample i's own log-likelihood (used for per-sample Fisher).
        """
        return self.train_steps([(embeds, mask, labels, reduction)])[0]

    def train_steps(
        self, requests: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]]
    ) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """Several clients' steps in one forward/backward (cross-client micro-batching).

        Each request is right-padded to the longest T (pads are masked and carry no
        label; a causal LM's earlier positions never see them), the batches are
        concatenated, and the objective is the sum of each request's own loss: as
        samples do not interact, each request's gradient is exactly the one it
        would get alone.
        """
        losses, x, counts = self.losses(requests)
        (grad,) = torch.autograd.grad(losses.sum(), x)
        out, row = [], 0
        for (e, _, _, _), loss, n in zip(requests, losses, counts, strict=True):
            out.append((loss.detach(), grad[row : row + e.shape[0], : e.shape[1]].to(e.dtype), int(n)))
            row += e.shape[0]
        return out

    def losses(self, requests: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """-> (each request's loss (R,) with its graph, the concatenated input embeddings (leaf), label tokens per request)."""
        # Label tokens per request, counted on the host from the labels as they arrived (no device sync).
        counts = [int((lab[:, 1:] != IGNORE_INDEX).sum()) for _, _, lab, _ in requests]
        if 0 in counts:
            raise ValueError("labels contain no supervised token")
        dev = self.device
        T = max(e.shape[1] for e, _, _, _ in requests)
        pad = lambda t, v: F.pad(t.to(dev, torch.long), (0, T - t.shape[1]), value=v)  # noqa: E731 - (B, t) -> (B, T)
        x = torch.cat([F.pad(e.detach().to(dev, self.dtype), (0, 0, 0, T - e.shape[1])) for e, _, _, _ in requests]).requires_grad_(
            True
        )  # (ΣB, T, d)
        mask = torch.cat([pad(m, 0) for _, m, _, _ in requests])
        labels = torch.cat([pad(lab, IGNORE_INDEX) for _, _, lab, _ in requests])
        group = torch.cat([torch.full((e.shape[0],), i, device=dev) for i, (e, _, _, _) in enumerate(requests)])  # row -> request
        hidden = self.train_decoder(inputs_embeds=x, attention_mask=mask).last_hidden_state  # (ΣB, T, d), on the last shard's device
        targets = labels[:, 1:].to(hidden.device)  # token t+1 is predicted at position t
        sel = targets != IGNORE_INDEX  # (ΣB, T-1)
        logits = self.head(hidden[:, :-1][sel]).float()  # (N, V): only labelled positions, on the head's device
        tok_nll = F.cross_entropy(logits, targets[sel].to(logits.device), reduction="none")  # (N,)
        tok_group = group.to(tok_nll.device).unsqueeze(1).expand_as(sel)[sel.to(tok_nll.device)]  # (N,)
        nll = tok_nll.new_zeros(len(requests)).index_add(0, tok_group, tok_nll)  # per request
        scale = [1.0 / c if r == "mean" else 1.0 for c, (_, _, _, r) in zip(counts, requests, strict=True)]
        return nll * nll.new_tensor(scale), x, counts

    @torch.no_grad()
    def score(
        self,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        cand_embeds: torch.Tensor,
        cand_ids: torch.Tensor,
        cand_mask: torch.Tensor,
        max_cache_bytes: int | None = None,
        parts: object = None,
    ) -> torch.Tensor:
        """Log-likelihood of each candidate after each prompt -> (B, K) float32.

        embeds (B, T, d), mask (B, T): right-padded prompts.
        cand_embeds (K, L, d), cand_ids (K, L), cand_mask (K, L): right-padded candidates.
        max_cache_bytes: the prompts' KV cache is copied once per candidate; when B x K copies would
        hold more than this, candidates are scored a chunk at a time (the same log-likelihoods, less
        memory: at 7B, 8 prompts x 13 candidates x 640 tokens would be 35 GB of cache). None: no limit.
        """
        dev = self.device
        embeds, mask, cand_embeds = embeds.to(dev, self.dtype), mask.to(dev, torch.long), cand_embeds.to(dev, self.dtype)
        B, K, L = embeds.shape[0], cand_ids.shape[0], cand_ids.shape[1]
        lengths = mask.sum(1)  # (B,)
        out = self.decoder(inputs_embeds=embeds, attention_mask=mask, use_cache=True)
        h_last = out.last_hidden_state  # (B, T, d), on the last shard's device
        last = h_last[torch.arange(B, device=h_last.device), lengths.to(h_last.device) - 1]  # (B, d)
        logits = self.head(last).float()  # (B, V) on the head's device
        ids = cand_ids.to(logits.device, torch.long)
        first_lp = torch.log_softmax(logits, -1)[:, ids[:, 0]]  # (B, K)
        if L == 1:
            return first_lp
        cache, c_mask = out.past_key_values, cand_mask.to(dev, torch.long)
        per_token = cache_bytes(cache) // (B * mask.shape[1]) if max_cache_bytes is not None else 0
        chunk = candidates_per_pass(per_token, B, mask.shape[1] + L, K, max_cache_bytes)
        # Continue every prompt with `chunk` candidates at a time: the cache repeated `chunk` times.
        if chunk > 1:
            cache.batch_repeat_interleave(chunk)
        rest = []
        for k0 in range(0, K, chunk):
            n = min(chunk, K - k0)
            if n < chunk:  # the last, smaller chunk: keep n of each prompt's copies (a CPU index serves every shard's device)
                cache.batch_select_indices((torch.arange(B)[:, None] * chunk + torch.arange(n)[None]).reshape(-1))
            rest.append(self._continue(cache, mask, lengths, cand_embeds[k0:k0 + n], ids[k0:k0 + n], c_mask[k0:k0 + n]))
            if k0 + n < K:
                cache.crop(-L)  # back to the prompts alone, for the next chunk
        return first_lp + torch.cat(rest, dim=1)

    def _continue(
        self, cache: Any, mask: torch.Tensor, lengths: torch.Tensor, cand_embeds: torch.Tensor, ids: torch.Tensor, c_mask: torch.Tensor
    ) -> torch.Tensor:
        """Log-likelihood of candidate tokens 2..L after each prompt, `cache` holding the prompts repeated
        once per candidate (row b * K + k: prompt b, candidate k) -> (B, K)."""
        dev, B, (K, L) = self.device, mask.shape[0], ids.shape
        x = cand_embeds.repeat(B, 1, 1)  # (B*K, L, d)
        full_mask = torch.cat([mask.repeat_interleave(K, 0), c_mask.repeat(B, 1)], dim=1)  # (B*K, T+L)
        pos = lengths.repeat_interleave(K).unsqueeze(1) + torch.arange(L, device=dev).unsqueeze(0)  # (B*K, L)
        h = self.decoder(inputs_embeds=x, attention_mask=full_mask, position_ids=pos, past_key_values=cache).last_hidden_state
        # A contiguous 2-D input: torch's bf16 linear on a strided 3-D slice is ~400x slower on CPU.
        flat = h[:, :-1].reshape(-1, h.shape[-1]).contiguous()  # (B*K*(L-1), d)
        lp = torch.log_softmax(self.head(flat).float(), -1).view(B * K, L - 1, -1)  # (B*K, L-1, V)
        nxt = ids[:, 1:].repeat(B, 1)  # (B*K, L-1)
        tok_lp = lp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1) * c_mask[:, 1:].to(lp.device).repeat(B, 1)
        return tok_lp.sum(1).view(B, K)

    @torch.no_grad()
    def generate(
        self, embeds: torch.Tensor, mask: torch.Tensor, text_adapter: tuple[torch.Tensor, torch.Tensor, float], stop: Collection[int],
        decoding: Decoding = GREEDY, on_token: Callable[[list[int]], None] | None = None, parts: object = None,
    ) -> list[list[int]]:
        """Decode B prompts together (embeds (B, T, d), mask (B, T), padded on either side) with the KV
        cache -> each answer's token ids.

        Each generated token is embedded as the client's NanoEdge would embed it: this LLM's own
        input-embedding row through NanoAdapter-T (`text_adapter` = (A (r, d), B (d, r), scale)), so a
        client sends its prompts once and gets the whole answers back. The prompts are moved to the
        left (positions counted from each one's first token), so every row's next token comes at the
        same step. Greedy, or sampled (`decoding`: temperature, top_p nucleus, seed); an answer stops at a token in
        `stop` (not returned) or after decoding.max_new_tokens. `on_token` sees the first answer as it grows.
        `parts` (here and in train_step / score): how a client made `embeds`; in process, unused."""
        embed = self._token_embedder(text_adapter)
        x, mask, pos = left_aligned(embeds.to(self.device, self.dtype), mask.to(self.device, torch.long))
        temperature, top_p = decoding.temperature, decoding.top_p
        generator = torch.Generator(self.head.weight.device).manual_seed(decoding.seed) if temperature > 0 else None
        out = self.decoder(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=True)
        ids: list[list[int]] = [[] for _ in range(x.shape[0])]
        done = [False] * len(ids)
        for _ in range(decoding.max_new_tokens):
            nxt = next_tokens(self.head(out.last_hidden_state[:, -1]).float(), temperature, top_p, generator)
            for row, token in enumerate(nxt):
                done[row] = done[row] or token in stop
                if not done[row]:
                    ids[row].append(token)
            if all(done):
                break
            if on_token is not None and not done[0]:
                on_token(ids[0])
            mask, pos = torch.cat([mask, mask.new_ones(len(ids), 1)], dim=1), pos[:, -1:] + 1
            out = self.decoder(inputs_embeds=embed(nxt), attention_mask=mask, position_ids=pos, past_key_values=out.past_key_values,
                               use_cache=True)
        return ids

    def _token_embedder(self, text_adapter: tuple[torch.Tensor, torch.Tensor, float]) -> Callable[[list[int]], torch.Tensor]:
        """Token ids -> their embeddings (B, 1, d) through NanoAdapter-T, as the client's NanoEdge makes them."""
        table = self.model.get_input_embeddings()
        at = table.weight.device
        A, B, scale = text_adapter[0].to(at, torch.float32), text_adapter[1].to(at, torch.float32), float(text_adapter[2])

        def embed(tokens: list[int]) -> torch.Tensor:
            e = table(torch.tensor(tokens, device=at)[:, None]).float()
            return (e + scale * (e @ A.T) @ B.T).to(self.device, self.dtype)

        return embed


def left_aligned(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of a padded batch (x (B, T, d), mask (B, T)) with their tokens moved to the right end, in
    order, and pads to the left -> (x, mask, position ids counted from each row's first token)."""
    order = torch.argsort(mask, dim=1, stable=True)  # pads first, then the tokens, each group in order
    mask = mask.gather(1, order)
    x = x.gather(1, order.unsqueeze(-1).expand_as(x))
    return x, mask, (mask.cumsum(1) - 1).clamp(min=0)


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> list[int]:
    """The next token of each row of (B, V) logits: argmax, or a sample after temperature and nucleus
    (top_p) filtering, with transformers' logits warpers."""
    if temperature <= 0:
        return logits.argmax(-1).tolist()
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(temperature)(None, logits)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.multinomial(torch.softmax(scores, -1), 1, generator=generator)[:, 0].tolist()


def cache_bytes(cache: Any) -> int:
    """Bytes held by a transformers KV cache (every layer's keys and values)."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def candidates_per_pass(bytes_per_token: int, prompts: int, tokens: int, candidates: int, max_bytes: int | None) -> int:
    """How many candidates to score in one pass so that `prompts` x that many copies of a cache of
    `tokens` tokens (at `bytes_per_token` each) stay within `max_bytes`; at least 1, at most all."""
    if max_bytes is None:
        return candidates
    return max(1, min(candidates, max_bytes // max(1, prompts * tokens * bytes_per_token)))
