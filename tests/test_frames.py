import json
import struct

import pytest
import torch

from fednano.split.frames import MAGIC, Frame, FrameError, decode, dequantise, encode, quantise


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


# ------------------------------------------------------------------ one-byte (scaled) tensors
def test_int8_codes_against_hand_computed_values():
    # amax 1 -> scale 1/127; codes round(127 x) = [127, -64 (-63.5 rounds to even), 32 (31.75)]
    q = quantise(torch.tensor([1.0, -0.5, 0.25]), "int8")
    assert q.scale == pytest.approx(1 / 127) and q.codes.tolist() == [127, -64, 32]
    assert dequantise(q).tolist() == pytest.approx([1.0, -64 / 127, 32 / 127])
    zero = quantise(torch.zeros(3), "float8_e4m3")  # an all-zero tensor: scale 1, exact zeros
    assert zero.scale == 1.0 and dequantise(zero).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(("kind", "rel"), [("float8_e4m3", 2**-4), ("float8_e5m2", 2**-3), ("int8", None)])
def test_scaled_tensors_round_trip_within_their_precision_at_one_byte_a_value(kind, rel, device):
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(4, 6, 32, generator=g) * 0.03).to(device)
    frame = Frame("train", {"embeds": t, "mask": torch.ones(4, 6, dtype=torch.uint8)}, scaled={"embeds": kind})
    data = encode(frame)
    (hlen,) = struct.unpack_from("<I", data, 4)
    assert len(data) == 8 + hlen + t.numel() + 4 * 6  # one byte a value (+ the mask)
    back = decode(data)
    assert back.scaled == {"embeds": kind} and back.tensors["embeds"].dtype == torch.float32
    err = (back.tensors["embeds"] - t.cpu()).abs()
    amax = float(t.abs().max())
    if rel is None:  # int8: within half a step of the scale
        assert float(err.max()) <= amax / 127 / 2 + 1e-9
    else:  # float8: relative rounding error of its mantissa, where values are normal
        big = t.cpu().abs() > amax / 100
        assert bool((err[big] <= rel * t.cpu().abs()[big] + 1e-12).all())
    assert float(back.tensors["embeds"].abs().max()) == pytest.approx(amax, rel=rel or 1e-6)  # nothing saturates


@pytest.mark.parametrize(("spec", "needle"), [
    ({"dtype": "int8", "scale": -1.0}, "scale must be a finite number > 0"),
    ({"dtype": "int8", "scale": float("nan")}, "scale must be a finite number > 0"),
    ({"dtype": "int8"}, "scale must be a finite number > 0"),
    ({"dtype": "float32", "scale": 0.5}, "a scale comes only with a one-byte type"),
    ({"dtype": "int4", "scale": 0.5}, "a scale comes only with a one-byte type"),
])
def test_malformed_scaled_tensors_are_refused(spec, needle):
    with pytest.raises(FrameError, match=needle):
        decode(_raw({"op": "x", "tensors": [{"name": "e", "shape": [2], **spec}]}, b"\0" * 8))
