"""The client stub: ServerLLM's `train_step` / `score`, executed on the server.

Tensors go out in the wire dtype (bf16 by default) and every byte is counted
per op, both ways. A stream broken by the server (e.g. a frame refused for
size) is reopened on the next call. `timeout` is the deadline of one stream, so a
client ends its stream after each unit of work (`end_session`: the ClientApp does
after every message) rather than hold one stream for the whole run. The returned
gradient goes to the device the embeddings came from (the wire format is the only
CPU boundary).
"""

from __future__ import annotations

import queue
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import grpc
import torch

from fednano.devices import DTYPES
from fednano.split.endpoint import GREEDY, Decoding
from fednano.split.frames import SCALED, Frame, decode, encode
from fednano.split.parts import PROTOCOLS, EdgeParts
from fednano.split.server import METHOD


class SplitChannelError(RuntimeError):
    """The server refused a frame or failed; `status` is the gRPC-style code."""

    def __init__(self, status: str, message: str, missing: list[str] | None = None) -> None:
        super().__init__(f"split server: {status}: {message}")
        self.status = status
        self.missing = missing or []  # NOT_FOUND: the image keys the server does not hold


class SplitClient:
    def __init__(
        self, address: str, wire_dtype: str = "bfloat16", max_frame_mb: float = 64.0, timeout: float = 600.0,
        token: str | None = None, root_certificates: bytes | None = None, protocol: str = "activations",
    ) -> None:
        """token: the run's split-channel token; root_certificates: PEM of the CA (enables TLS);
        protocol: what crosses per step (split.parts.PROTOCOLS)."""
        self.address, self.protocol = address, PROTOCOLS[protocol]
        self._held: set[str] = set()  # image keys the server is known to hold (this process sent or asked)
        # floats go as this dtype, or (a one-byte type) as scaled codes: Frame.scaled
        self.wire, self.scaled = (torch.float32, wire_dtype) if wire_dtype in SCALED else (DTYPES[wire_dtype], "")
        limit = int(max_frame_mb * 1024 * 1024) + 64 * 1024
        options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
        if root_certificates is not None:
            self._channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=root_certificates), options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._call = self._channel.stream_stream(METHOD, request_serializer=None, response_deserializer=None)
        self.timeout = timeout
        self._requests: queue.Queue | None = None
        self._responses: Iterator[bytes] | None = None
        self.bytes_up: dict[str, int] = defaultdict(int)  # per op
        self.bytes_down: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    # --- transport -------------------------------------------------------------------
    def _open(self) -> None:
        self._requests = queue.Queue()
        self._responses = self._call(iter(self._requests.get, None), timeout=self.timeout, metadata=self._metadata)

    def request_bytes(self, data: bytes, op: str = "raw") -> Frame:
        """Send one encoded frame, return the decoded reply (raises SplitChannelError)."""
        if self._responses is None:
            self._open()
        assert self._requests is not None and self._responses is not None
        self._requests.put(data)
        try:
            reply = next(self._responses)
        except grpc.RpcError as e:
            self._close_stream()
            raise SplitChannelError(e.code().name, e.details() or "") from None
        except StopIteration:
            self._close_stream()
            raise SplitChannelError("UNAVAILABLE", "stream closed by the server") from None
        self.bytes_up[op] += len(data)
        self.bytes_down[op] += len(reply)
        self.calls[op] += 1
        frame = decode(reply)
        if frame.op == "error":
            missing = frame.meta.get("missing")
            raise SplitChannelError(frame.meta.get("status", "UNKNOWN"), frame.meta.get("message", ""),
                                    [str(k) for k in missing] if isinstance(missing, list) else None)
        return frame

    def request(self, frame: Frame) -> Frame:
        return self.request_bytes(encode(frame), frame.op)

    def end_session(self) -> None:
        """Close the current stream (the channel stays); the next request opens a fresh one,
        with a fresh deadline."""
        self._close_stream()

    def _close_stream(self) -> None:
        if self._requests is not None:
            self._requests.put(None)
        self._requests = self._responses = None

    def close(self) -> None:
        self._close_stream()
        self._channel.close()

    def __enter__(self) -> SplitClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the ServerLLM interface ----------------------------------------------------
    def info(self) -> dict:
        return self.request(Frame("info")).meta

    def train_step(
        self, embeds: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, reduction: str = "mean", *, parts: EdgeParts | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        tensors, meta, scaled = self._inputs(embeds, parts)
        if "embeds" not in tensors and parts is not None and parts.weights is not None and reduction == "sum":
            tensors["fisher_weights"] = parts.weights.detach().float()  # a Fisher pass: the server sums its adapters' squares
        reply = self._parts_request(Frame(
            "train", {**tensors, "mask": mask.to(torch.uint8), "labels": labels.to(torch.int32)}, {**meta, "reduction": reduction}, scaled
        ), parts)
        loss, n_tokens = reply.tensors["loss"].float(), int(reply.meta["n_tokens"])
        if "grad" in reply.tensors:
            return loss, reply.tensors["grad"].to(embeds.device, embeds.dtype), n_tokens
        assert parts is not None  # a parts reply: the adapters' gradients (or Fisher sums), and the text rows' if they were sent
        for name in parts.adapters:
            if f"grad_{name}_A" in reply.tensors:
                parts.add_grads(name, reply.tensors[f"grad_{name}_A"], reply.tensors[f"grad_{name}_B"])
            for w in ("A", "B"):
                if f"fisher_{name}_{w}" in reply.tensors:
                    parts.fisher[f"{name}.{w}.weight"] = reply.tensors[f"fisher_{name}_{w}"]
        grad = torch.zeros_like(embeds)
        if "grad_text" in reply.tensors:
            grad[~parts.is_image] = reply.tensors["grad_text"].to(embeds.device, embeds.dtype)
        return loss, grad, n_tokens

    def hidden(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """split.label_private: the LLM's final hidden states at `positions` (B, T) bool, (N, d) float32 on embeds' device."""
        tensors = {"embeds": embeds.detach().to(self.wire), "mask": mask.to(torch.uint8), "positions": positions.to(torch.uint8)}
        frame = Frame("hidden", tensors, {}, self._scaled("embeds"))
        return self.request(frame).tensors["hidden"].to(embeds.device, torch.float32)

    def hidden_backward(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, grad_hidden: torch.Tensor) -> torch.Tensor:
        """split.label_private: d loss / d embeds from the client's d loss / d hidden states (N, d)."""
        frame = Frame("hidden_grad", {"embeds": embeds.detach().to(self.wire), "mask": mask.to(torch.uint8),
                                      "positions": positions.to(torch.uint8), "grad_hidden": grad_hidden.detach().to(self.wire)},
                      {}, self._scaled("embeds", "grad_hidden"))
        return self.request(frame).tensors["grad"].to(embeds.device, embeds.dtype)

    def score(
        self, embeds: torch.Tensor, mask: torch.Tensor, cand_embeds: torch.Tensor, cand_ids: torch.Tensor, cand_mask: torch.Tensor,
        *, parts: EdgeParts | None = None,
    ) -> torch.Tensor:
        tensors, meta, scaled = self._inputs(embeds, parts)
        tensors |= {"mask": mask.to(torch.uint8), "cand_ids": cand_ids.to(torch.int32), "cand_mask": cand_mask.to(torch.uint8)}
        if "ids" not in tensors:  # with ids the server embeds the candidates itself
            tensors["cand_embeds"], scaled = cand_embeds.detach().to(self.wire), scaled | self._scaled("cand_embeds")
        return self._parts_request(Frame("score", tensors, meta, scaled), parts).tensors["logprobs"]

    def generate(
        self, embeds: torch.Tensor, mask: torch.Tensor, text_adapter: tuple[torch.Tensor, torch.Tensor, float], stop: list[int],
        decoding: Decoding = GREEDY, *, parts: EdgeParts | None = None,
    ) -> list[list[int]]:
        """A batch of answers in one round trip: the prompts' embeddings and NanoAdapter-T go up (the server
        embeds each generated token with its own table through the adapter), each answer's token ids come down."""
        A, B, scale = text_adapter
        tensors, meta, scaled = self._inputs(embeds, parts)
        reply = self._parts_request(Frame(
            "generate",
            {**tensors, "mask": mask.to(torch.uint8), "adapter_t_A": A.detach().float(), "adapter_t_B": B.detach().float()},
            {**meta, "scale": float(scale), "stop": [int(t) for t in stop], **decoding.to_meta()},
            scaled,
        ), parts)
        return [[int(t) for t in row if t >= 0] for row in reply.tensors["tokens"].tolist()]

    # --- the protocols (split.parts) ------------------------------------------------------
    def _inputs(self, embeds: torch.Tensor, parts: EdgeParts | None) -> tuple[dict[str, torch.Tensor], dict, dict[str, str]]:
        """A request's input embeddings as this protocol sends them: (tensors, meta, scaled)."""
        if parts is None or not self.protocol.caches_features:
            return {"embeds": embeds.detach().to(self.wire)}, {}, self._scaled("embeds")
        keys = parts.keys()
        self._ensure_held(keys, parts)
        tensors: dict[str, torch.Tensor] = {}
        meta: dict = {"image_keys": keys}
        for name in ("adapter_i", "adapter_t") if self.protocol.sends_ids else ("adapter_i",):
            A, B, scale = parts.adapters[name]
            tensors |= {f"{name}_A": A.detach().float(), f"{name}_B": B.detach().float()}
            meta[f"scale_{name}"] = float(scale)
        if self.protocol.sends_ids:
            return tensors | {"ids": parts.input_ids.to(torch.int32)}, meta, {}
        text = embeds.detach()[~parts.is_image].to(self.wire)  # (S, d): the rows that are not image slots
        return tensors | {"slots": parts.is_image.to(torch.uint8), "text": text}, meta, self._scaled("text")

    def _ensure_held(self, keys: list[str], parts: EdgeParts) -> None:
        """Before a request: of the images this process has not seen the server hold, ask which it lacks (a few
        bytes a key) and send those. A node without a warm worker starts a fresh process per message; the
        server's cache outlives it, so what it already holds is not sent again."""
        unknown = [k for k in dict.fromkeys(keys) if k not in self._held]
        if not unknown:
            return
        missing = self.request(Frame("features", meta={"keys": unknown})).meta.get("missing", unknown)
        if missing:
            self._send_features(missing, parts)
        self._held.update(unknown)

    def _send_features(self, keys: list[str], parts: EdgeParts) -> None:
        """These images' frozen connector outputs go up (the server caches them under their keys)."""
        assert parts.visual is not None
        index = {k: i for i, k in enumerate(parts.keys())}
        feats = parts.visual[[index[k] for k in keys]].to(self.wire)
        self.request(Frame("features", {"features": feats}, {"keys": keys}, self._scaled("features")))
        self._held.update(keys)

    def _parts_request(self, frame: Frame, parts: EdgeParts | None) -> Frame:
        """Send; images the server no longer holds (evicted since, or a restarted server) it names in a NOT_FOUND
        reply: they go up, and the request again, once."""
        try:
            return self.request(frame)
        except SplitChannelError as e:
            if e.status != "NOT_FOUND" or parts is None or not e.missing:
                raise
            missing = list(dict.fromkeys(k for k in e.missing if k in frame.meta.get("image_keys", [])))
            if not missing:
                raise
        self._send_features(missing, parts)
        return self.request(frame)

    def _scaled(self, *names: str) -> dict[str, str]:
        """Which tensors of a request go as one-byte codes (split.wire_dtype float8_* / int8)."""
        return dict.fromkeys(names, self.scaled) if self.scaled else {}

    def fetch_bundle(self, digest: str, out: Path) -> int:
        """The server's packed client bundle `digest`, a frame at a time (within split.max_frame_mb), into the file
        `out`; returns its size. The caller verifies it (backbones.digest.unpack) before using it."""
        offset, total = 0, -1
        with open(out, "wb") as f:
            while offset != total:
                reply = self.request(Frame("bundle", meta={"digest": digest, "offset": offset}))
                data, total = reply.tensors["data"], int(reply.meta["total"])
                if reply.meta.get("digest") != digest or (data.numel() == 0 and offset < total) or offset + data.numel() > total:
                    raise SplitChannelError("DATA_LOSS", f"bad bundle chunk at offset {offset} of {total}")
                f.write(data.numpy().tobytes())
                offset += data.numel()
        return total

    def traffic(self) -> dict[str, int]:
        train = ("train", "hidden", "hidden_grad")  # a training step's frames (two in the label-private split)
        return {
            "activations_up": sum(self.bytes_up[op] for op in train),
            "gradients_down": sum(self.bytes_down[op] for op in train),
            "eval_activations_up": self.bytes_up["score"],
            "eval_scores_down": self.bytes_down["score"],
            "eval_generate_up": self.bytes_up["generate"],
            "eval_answers_down": self.bytes_down["generate"],
            "features_up": self.bytes_up["features"],
            "features_down": self.bytes_down["features"],
        }
