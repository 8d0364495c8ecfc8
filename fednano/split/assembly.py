"""The server's side of the parts protocols (split.parts): the image-feature cache, and a request's
input embeddings assembled from its parts with the client's adapters, ready to back-propagate into them.

    text rows (S, d) or token ids (B, T) -> [NanoAdapter-T, ids only] ─┐
    image keys -> cached connector outputs (M, N, d) -> NanoAdapter-I ─┴-> embeddings (B, T, d)

Every check names the tensor or field at fault (FrameError -> INVALID_ARGUMENT); a key the cache does
not hold (never sent, or evicted) is MissingFeatures -> NOT_FOUND, and the client sends it again.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from fednano.data.prompts import IMAGE_PLACEHOLDER
from fednano.split.frames import Frame, FrameError
from fednano.split.parts import low_rank, sample_grads, weighted_squares

_FLOAT = (torch.bfloat16, torch.float16, torch.float32)
_INT = (torch.int64, torch.int32, torch.uint8, torch.bool)


class MissingFeatures(FrameError):
    """The request names image features the cache does not hold (status NOT_FOUND); `keys`: which."""

    def __init__(self, message: str, keys: list[str]) -> None:
        super().__init__(message)
        self.keys = keys


def tensor(frame: Frame, name: str, kinds: tuple, ndim: int) -> torch.Tensor:
    """A request's tensor, checked for presence, dtype, rank and (floats) finiteness."""
    t = frame.tensors.get(name)
    if t is None:
        raise FrameError(f"op {frame.op!r}: missing tensor {name!r}")
    if t.dtype not in kinds:
        raise FrameError(f"tensor {name!r}: dtype {t.dtype} not allowed here")
    if t.dim() != ndim:
        raise FrameError(f"tensor {name!r}: expected {ndim} dims, got shape {tuple(t.shape)}")
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise FrameError(f"tensor {name!r}: contains NaN or Inf")
    return t


def check_mask(frame: Frame, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A (B, T) attention mask of 0/1, right-padded, every row non-empty, with the given shape."""
    mask = tensor(frame, name, _INT, 2).long()
    if tuple(mask.shape) != shape:
        raise FrameError(f"tensor {name}: shape {tuple(mask.shape)} != {shape}")
    if mask.numel() == 0:
        raise FrameError(f"tensor {name}: empty batch")
    if not ((mask == 0) | (mask == 1)).all():
        raise FrameError(f"tensor {name}: values must be 0 or 1")
    if (mask[:, 0] != 1).any():
        raise FrameError(f"tensor {name}: sequences must be right-padded and non-empty")
    return mask


class FeatureCache:
    """Image features per (client, key), least recently used out first, at most `max_bytes` in all.
    A client's keys are its own: nobody can ask for another client's images."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.stats = {"stored": 0, "hits": 0, "misses": 0, "evicted": 0}

    def put(self, client: str, keys: list[str], features: torch.Tensor) -> None:
        with self._lock:
            for key, f in zip(keys, features, strict=True):
                old = self._items.pop((client, key), None)
                self.bytes -= 0 if old is None else old.nbytes
                self._items[(client, key)] = f.clone()
                self.bytes += f.nbytes
                self.stats["stored"] += 1
            while self.bytes > self.max_bytes and self._items:
                self.bytes -= self._items.popitem(last=False)[1].nbytes
                self.stats["evicted"] += 1

    def missing(self, client: str, keys: list[str]) -> list[str]:
        """Which of `keys` this client's cache does not hold."""
        with self._lock:
            return [k for k in dict.fromkeys(keys) if (client, k) not in self._items]

    def get(self, client: str, keys: list[str]) -> torch.Tensor:
        """-> (M, N, d) in key order; raises MissingFeatures naming how many are not held."""
        with self._lock:
            missing = [k for k in keys if (client, k) not in self._items]
            self.stats["misses"] += len(missing)
            if missing:
                raise MissingFeatures(f"{len(missing)} of {len(keys)} image features are not cached (send them)", missing)
            self.stats["hits"] += len(keys)
            for k in keys:
                self._items.move_to_end((client, k))
            return torch.stack([self._items[(client, k)] for k in keys])


def keys_of(frame: Frame, name: str = "image_keys") -> list[str]:
    keys = frame.meta.get(name, [])
    if not isinstance(keys, list) or not all(isinstance(k, str) and 0 < len(k) <= 128 for k in keys):
        raise FrameError(f"meta.{name} must be a list of key strings")
    return keys


def store_features(frame: Frame, client: str, cache: FeatureCache, hidden: int, device: torch.device) -> dict:
    """The `features` op: connector outputs (K, N, d) under meta.keys -> {"stored": K}; without the tensor, a
    question -> {"missing": the keys the cache does not hold}."""
    keys = keys_of(frame, "keys")
    if "features" not in frame.tensors:
        return {"missing": cache.missing(client, keys)}
    feats = tensor(frame, "features", _FLOAT, 3)
    if len(keys) != feats.shape[0] or feats.shape[2] != hidden:
        raise FrameError(f"tensor features: shape {tuple(feats.shape)} != ({len(keys)} keys, N, {hidden})")
    cache.put(client, keys, feats.to(device))
    return {"stored": len(keys)}


def adapter_of(frame: Frame, name: str, hidden: int, device: torch.device, grad: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A client's adapter as sent: `{name}_A` (r, d), `{name}_B` (d, r), meta `scale_{name}`, as float32 leaves."""
    A, B = tensor(frame, f"{name}_A", _FLOAT, 2), tensor(frame, f"{name}_B", _FLOAT, 2)
    if A.shape[1] != hidden or tuple(B.shape) != (hidden, A.shape[0]):
        raise FrameError(f"tensors {name}_A {tuple(A.shape)} / {name}_B {tuple(B.shape)}: expected (r, {hidden}) and ({hidden}, r)")
    scale = frame.meta.get(f"scale_{name}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise FrameError(f"meta.scale_{name} must be a finite number, got {scale!r}")
    leaf = lambda t: t.to(device, torch.float32).requires_grad_(grad)  # noqa: E731
    return leaf(A), leaf(B), float(scale)


@dataclass
class Assembled:
    """A request's input embeddings (B, T, d) float32, with a graph to `leaves` (wire names) when training."""

    embeds: torch.Tensor
    mask: torch.Tensor
    leaves: dict[str, torch.Tensor]
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    slots: torch.Tensor  # (B, T) image slots
    words: torch.Tensor | None  # (B, T, d) the table rows NanoAdapter-T received (ids only)
    visual: torch.Tensor | None  # (M*N, d) the cached features NanoAdapter-I received, in slot order

    def inputs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """adapter -> (what it received, laid out as the sequence (B, T, d), where its output is used (B, T))."""
        out = {} if self.words is None else {"adapter_t": (self.words, ~self.slots)}
        if self.visual is not None:
            placed = self.visual.new_zeros(*self.slots.shape, self.visual.shape[-1]).masked_scatter(self.slots.unsqueeze(-1), self.visual)
            out["adapter_i"] = (placed, self.slots)
        return out

    def grads(self, grad: torch.Tensor) -> dict[str, torch.Tensor]:
        """d loss / d each leaf, from d loss / d embeds: the reply's `grad_<leaf>` tensors."""
        found = torch.autograd.grad(self.embeds, list(self.leaves.values()), grad.to(self.embeds), allow_unused=True)
        return {f"grad_{k}": torch.zeros_like(v) if g is None else g for (k, v), g in zip(self.leaves.items(), found, strict=True)}

    def fisher(self, grad: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weighted squared per-sample gradients of each adapter applied here (`fisher_<adapter>_A/B`), from the
        per-sample gradient of the embeddings (B, T, d) (a summed loss: row b is sample b's own)."""
        out: dict[str, torch.Tensor] = {}
        for name, (x, used) in self.inputs().items():
            g = grad.to(x).masked_fill(~used.unsqueeze(-1), 0)
            A, B, scale = self.adapters[name]
            per_A, per_B = sample_grads((A.detach(), B.detach(), scale), x, g)
            out |= {f"fisher_{name}_A": weighted_squares(per_A, weights), f"fisher_{name}_B": weighted_squares(per_B, weights)}
        return out


def assemble(frame: Frame, client: str, cache: FeatureCache, table: nn.Embedding, train: bool) -> Assembled:
    """The embeddings a parts request describes, made as the client's NanoEdge makes them (NanoEdge.embed)."""
    hidden, device = table.embedding_dim, table.weight.device
    adapters = {"adapter_i": adapter_of(frame, "adapter_i", hidden, device, train)}
    if "ids" in frame.tensors:  # cached-features+ids: the text is embedded here, through NanoAdapter-T
        ids = tensor(frame, "ids", (torch.int64, torch.int32), 2).to(device, torch.long)
        slots = ids == IMAGE_PLACEHOLDER
        if (((ids < 0) | (ids >= table.num_embeddings)) & ~slots).any():
            raise FrameError(f"tensor ids: ids must be in [0, {table.num_embeddings}) or the image placeholder {IMAGE_PLACEHOLDER}")
        adapters["adapter_t"] = adapter_of(frame, "adapter_t", hidden, device, train)
        words = table(ids.clamp(min=0)).float()
        text, leaves = low_rank(words, adapters["adapter_t"]), {}
    else:  # cached-features: the text rows come as the client embedded them
        slots = tensor(frame, "slots", _INT, 2).to(device).bool()
        rows = tensor(frame, "text", _FLOAT, 2).to(device, torch.float32).requires_grad_(train)
        if tuple(rows.shape) != (int((~slots).sum()), hidden):
            raise FrameError(f"tensor text: shape {tuple(rows.shape)} != ({int((~slots).sum())} text positions, {hidden})")
        words, text, leaves = None, rows.new_zeros(*slots.shape, hidden).masked_scatter(~slots.unsqueeze(-1), rows), {"text": rows}
    mask = check_mask(frame, "mask", tuple(slots.shape)).to(device)
    keys, n_slots = keys_of(frame), int(slots.sum())
    images = cache.get(client, keys).to(torch.float32) if keys else text.new_zeros(0, 1, hidden)
    if images.shape[0] * images.shape[1] != n_slots:
        raise FrameError(f"meta.image_keys: {len(keys)} images x {images.shape[1]} tokens != {n_slots} image slots")
    vis = images.reshape(-1, hidden) if n_slots else None
    if vis is not None:
        text = text.masked_scatter(slots.unsqueeze(-1), low_rank(vis, adapters["adapter_i"]))
    for name, (A, B, _) in adapters.items():
        leaves |= {f"{name}_A": A, f"{name}_B": B} if train else {}
    return Assembled(text, mask, leaves, adapters, slots, words, vis)
