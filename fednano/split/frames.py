"""Wire format of the split channel: one frame per request or reply.

    b"FNS1" | u32 little-endian header length | header (UTF-8 JSON) | payload

header = {"op": str, "meta": {...}, "tensors": [{"name", "dtype", "shape"}, ...]};
the payload is the tensors' raw bytes, concatenated in header order (C order,
little-endian). Decoding checks everything a peer could get wrong and raises
FrameError with a message that says what and where.

Compressed tensors (`split.wire_dtype` = float8_e4m3, float8_e5m2 or int8): a float tensor goes as
one byte per value, codes = x / scale in that type (int8: rounded), with one float32 `scale` per
tensor in its spec (amax / the type's largest value, so nothing saturates). Decoding gives back
codes x scale in float32 and records the type in `Frame.scaled`, so a reply can be sent the same way.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field

import torch

from fednano.devices import DTYPE_NAMES, DTYPES

MAGIC = b"FNS1"
_HEADER_LEN = struct.Struct("<I")
MAX_HEADER_BYTES = 64 * 1024
MAX_DIMS = 8


class FrameError(ValueError):
    """A malformed frame; the message is sent back to the peer as INVALID_ARGUMENT."""


# one-byte wire types: name -> (torch dtype of the codes, largest code)
SCALED: dict[str, tuple[torch.dtype, float]] = {
    "float8_e4m3": (torch.float8_e4m3fn, 448.0),
    "float8_e5m2": (torch.float8_e5m2, 57344.0),
    "int8": (torch.int8, 127.0),
}


@dataclass(frozen=True)
class Scaled:
    """A float tensor as one-byte codes and one scale: value = codes x scale."""

    codes: torch.Tensor
    scale: float
    kind: str  # a key of SCALED


def quantise(t: torch.Tensor, kind: str) -> Scaled:
    """`t` -> `kind` codes with one per-tensor scale (amax / the largest code; 1 for an all-zero tensor)."""
    dtype, top = SCALED[kind]
    x = t.detach().float()
    amax = float(x.abs().max()) if x.numel() else 0.0
    scale = amax / top if amax > 0 else 1.0
    y = (x / scale).clamp(-top, top)
    return Scaled((y.round() if dtype == torch.int8 else y).to(dtype), scale, kind)


def dequantise(s: Scaled) -> torch.Tensor:
    return s.codes.float() * s.scale


@dataclass
class Frame:
    op: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    # tensor name -> the one-byte type (a key of SCALED) it goes in (encode) or came in (decode)
    scaled: dict[str, str] = field(default_factory=dict)


def encode(frame: Frame) -> bytes:
    specs, chunks = [], []
    for name, t in frame.tensors.items():
        spec: dict = {"name": name}
        if name in frame.scaled:
            q = quantise(t, frame.scaled[name])
            spec |= {"dtype": q.kind, "scale": q.scale}
            t = q.codes
        elif t.dtype in DTYPE_NAMES:
            spec["dtype"] = DTYPE_NAMES[t.dtype]
        else:
            raise FrameError(f"tensor {name!r}: dtype {t.dtype} cannot be sent")
        t = t.detach().contiguous().cpu()
        specs.append({**spec, "shape": list(t.shape)})
        chunks.append(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    header = json.dumps({"op": frame.op, "meta": frame.meta, "tensors": specs}, separators=(",", ":")).encode()
    return b"".join([MAGIC, _HEADER_LEN.pack(len(header)), header, *chunks])


def decode(data: bytes, max_bytes: int | None = None) -> Frame:
    if max_bytes is not None and len(data) > max_bytes:
        raise FrameError(f"frame of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    if len(data) < 8 or data[:4] != MAGIC:
        raise FrameError("not a split-channel frame (bad magic)")
    (hlen,) = _HEADER_LEN.unpack_from(data, 4)
    if hlen > MAX_HEADER_BYTES or 8 + hlen > len(data):
        raise FrameError(f"truncated or oversized header ({hlen} bytes declared, {len(data) - 8} available)")
    try:
        header = json.loads(data[8 : 8 + hlen].decode())
        op, meta, specs = header["op"], header.get("meta", {}), header["tensors"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise FrameError(f"unreadable header: {e}") from None
    if not isinstance(op, str) or not isinstance(meta, dict) or not isinstance(specs, list):
        raise FrameError("header fields have the wrong types")
    offset = 8 + hlen
    out = Frame(op, {}, meta)
    for spec in specs:
        name, dtype, shape, scale = _check_spec(spec)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if offset + nbytes > len(data):
            raise FrameError(f"tensor {name!r}: truncated payload ({len(data) - offset} of {nbytes} bytes)")
        raw = bytearray(data[offset : offset + nbytes])
        t = (torch.frombuffer(raw, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)).view(dtype).reshape(shape)
        if scale is not None:
            out.scaled[name] = spec["dtype"]
            t = dequantise(Scaled(t, scale, spec["dtype"]))
        out.tensors[name] = t
        offset += nbytes
    if offset != len(data):
        raise FrameError(f"{len(data) - offset} trailing bytes after the declared tensors")
    return out


def _check_spec(spec: object) -> tuple[str, torch.dtype, list[int], float | None]:
    if not isinstance(spec, dict):
        raise FrameError("tensor spec is not an object")
    name, dtype, shape, scale = spec.get("name"), spec.get("dtype"), spec.get("shape"), spec.get("scale")
    if not isinstance(name, str):
        raise FrameError("tensor spec without a name")
    if scale is not None or dtype in SCALED:
        if dtype not in SCALED:
            raise FrameError(f"tensor {name!r}: a scale comes only with a one-byte type {sorted(SCALED)}, not {dtype!r}")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
            raise FrameError(f"tensor {name!r}: scale must be a finite number > 0, got {scale!r}")
    elif dtype not in DTYPES:
        raise FrameError(f"tensor {name!r}: unsupported dtype {dtype!r} (allowed: {sorted(DTYPES)} or {sorted(SCALED)})")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise FrameError(f"tensor {name!r}: bad shape {shape!r}")
    if isinstance(scale, (int, float)):  # checked above: a one-byte type and a finite scale > 0
        return name, SCALED[dtype][0], shape, float(scale)
    return name, DTYPES[dtype], shape, None


def error_frame(status: str, message: str, **details: object) -> Frame:
    return Frame("error", meta={"status": status, "message": message, **details})
