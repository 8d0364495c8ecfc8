import json
import struct

import pytest
import torch

from fednano.split.frames import MAGIC, Frame, FrameError, decode, encode


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int64, torch.int32, torch.uint8, torch.bool])
def test_round_trip_every_dtype(dtype, device):
    """From any device: encoding is the one place a tensor goes to the CPU."""
    t = (torch.randn(2, 3, 4, device=device) * 10).to(dtype)
    back = decode(encode(Frame("train", {"x": t, "empty": torch.zeros(0, 5, dtype=dtype, device=device)}, {"k": 1})))
    assert back.op == "train" and back.meta == {"k": 1}
    assert back.tensors["x"].device.type == "cpu"
    assert back.tensors["x"].dtype == dtype and torch.equal(back.tensors["x"], t.cpu())
    assert back.tensors["empty"].shape == (0, 5)


def test_frame_size_is_header_plus_raw_bytes():
    t = torch.zeros(8, 16, 32, dtype=torch.bfloat16)
    data = encode(Frame("train", {"embeds": t}))
    (hlen,) = struct.unpack_from("<I", data, 4)
    assert len(data) == 8 + hlen + t.numel() * 2


def _raw(header: dict, payload: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(h)) + h + payload


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"GARBAGE-not-a-frame", "bad magic"),
        (b"", "bad magic"),
        (MAGIC + struct.pack("<I", 1000) + b"{}", "truncated or oversized header"),
        (MAGIC + struct.pack("<I", 3) + b"{{{", "unreadable header"),
        (_raw({"op": "x", "tensors": [{"name": "a", "dtype": "complex64", "shape": [1]}]}, b"\0" * 8), "unsupported dtype"),
        (_raw({"op": "x", "tensors": [{"name": "a", "dtype": "float32", "shape": [-1]}]}), "bad shape"),
        (_raw({"op": "x", "tensors": [{"name": "a", "dtype": "float32", "shape": [4]}]}, b"\0" * 8), "truncated payload"),
        (_raw({"op": "x", "tensors": [{"name": "a", "dtype": "float32", "shape": [1]}]}, b"\0" * 12), "trailing bytes"),
        (_raw({"op": 3, "tensors": []}), "wrong types"),
    ],
)
def test_malformed_frames_raise_clear_errors(data, needle):
    with pytest.raises(FrameError, match=needle):
        decode(data)


def test_oversized_frame_is_refused():
    data = encode(Frame("train", {"x": torch.zeros(1000)}))
    with pytest.raises(FrameError, match="exceeds the limit"):
        decode(data, max_bytes=1000)
