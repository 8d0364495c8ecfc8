"""Wire format of the split channel: one frame per request or reply.

    b"FNS1" | u32 little-endian header length | header (UTF-8 JSON) | payload

header = {"op": str, "meta": {...}, "tensors": [{"name", "dtype", "shape"}, ...]};
the payload is the tensors' raw bytes, concatenated in header order (C order,
little-endian). Decoding checks everything a peer could get wrong and raises
FrameError with a message that says what and where.
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


@dataclass
class Frame:
    op: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


def encode(frame: Frame) -> bytes:
    specs, chunks = [], []
    for name, t in frame.tensors.items():
        if t.dtype not in DTYPE_NAMES:
            raise FrameError(f"tensor {name!r}: dtype {t.dtype} cannot be sent")
        t = t.detach().contiguous().cpu()
        specs.append({"name": name, "dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape)})
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
    tensors: dict[str, torch.Tensor] = {}
    for spec in specs:
        name, dtype, shape = _check_spec(spec)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if offset + nbytes > len(data):
            raise FrameError(f"tensor {name!r}: truncated payload ({len(data) - offset} of {nbytes} bytes)")
        raw = bytearray(data[offset : offset + nbytes])
        t = torch.frombuffer(raw, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
        tensors[name] = t.view(dtype).reshape(shape)
        offset += nbytes
    if offset != len(data):
        raise FrameError(f"{len(data) - offset} trailing bytes after the declared tensors")
    return Frame(op, tensors, meta)


def _check_spec(spec: object) -> tuple[str, torch.dtype, list[int]]:
    if not isinstance(spec, dict):
        raise FrameError("tensor spec is not an object")
    name, dtype, shape = spec.get("name"), spec.get("dtype"), spec.get("shape")
    if not isinstance(name, str):
        raise FrameError("tensor spec without a name")
    if dtype not in DTYPES:
        raise FrameError(f"tensor {name!r}: unsupported dtype {dtype!r} (allowed: {sorted(DTYPES)})")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise FrameError(f"tensor {name!r}: bad shape {shape!r}")
    return name, DTYPES[dtype], shape


def error_frame(status: str, message: str) -> Frame:
    return Frame("error", meta={"status": status, "message": message})
