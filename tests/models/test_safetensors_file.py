"""SafetensorsFile: reads equal safetensors' own loader; every malformed header is refused with names."""

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lazarus_core.models import CheckpointError
from lazarus_core.models.safetensors_file import SafetensorsFile


@pytest.fixture
def sample(tmp_path):
    tensors = {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(4, 7).half(),
        "bf16": torch.randn(6, 2, 3).bfloat16(),
        "fp8": torch.randn(5, 9).to(torch.float8_e4m3fn),
        "u8": torch.randint(0, 256, (4, 3, 16), dtype=torch.uint8),
        "i64": torch.arange(10),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def test_reads_equal_safe_open(sample):
    f = SafetensorsFile(sample)
    assert f.metadata == {"format": "pt"}
    with safe_open(str(sample), "pt") as ref:
        for name in ref.keys():
            expected = ref.get_tensor(name)
            got = f.read(name)
            if expected.dtype == torch.float8_e4m3fn:
                expected = expected.view(torch.uint8)
            assert got.dtype == expected.dtype and torch.equal(got, expected), name
            if expected.dim() >= 1 and expected.shape[0] > 0:
                for i in (0, expected.shape[0] - 1):
                    row = ref.get_slice(name)[i]
                    row = row.view(torch.uint8) if row.dtype == torch.float8_e4m3fn else row
                    assert torch.equal(f.read_row(name, i), row), (name, i)


def test_row_index_out_of_range_and_missing_tensor(sample):
    f = SafetensorsFile(sample)
    with pytest.raises(IndexError, match=r"t\.safetensors: tensor 'u8' of shape \[4, 3, 16\]: index 4"):
        f.read_row("u8", 4)
    with pytest.raises(CheckpointError, match=r"t\.safetensors: tensor 'nope' is not in this file"):
        f.read("nope")


def _with_header(path, header, data=b"\0" * 64):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("entry,match", [
    ({"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}, "unknown dtype 'F4'"),
    ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "invalid shape"),
    ({"dtype": "F32", "shape": [2.5], "data_offsets": [0, 4]}, "invalid shape"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [4, 0]}, "invalid data_offsets"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, "span 4 bytes but shape \\[2\\] of F32 needs 8"),
    ({"dtype": "F32", "shape": [32], "data_offsets": [0, 128]}, "truncated file"),
    ({"dtype": "U8", "shape": [2**62, 2**62], "data_offsets": [0, 64]}, "needs"),
])
def test_malformed_entries_name_the_tensor(tmp_path, entry, match):
    path = _with_header(tmp_path / "bad.safetensors", {"w": entry})
    with pytest.raises(CheckpointError, match=rf"bad\.safetensors: tensor 'w'.*{match}"):
        SafetensorsFile(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        SafetensorsFile(tmp_path / "absent.safetensors")


def _f32(begin, end):
    return {"dtype": "F32", "shape": [(end - begin) // 4], "data_offsets": [begin, end]}


# Files the safetensors library refuses: the tensors must tile the data section exactly.
@pytest.mark.parametrize("header,data_bytes,match", [
    ({"a": _f32(0, 8), "b": _f32(4, 12)}, 16, r"tensor 'b': data_offsets \[4, 12\] overlap tensor 'a' \(ends at 8\)"),
    ({"a": _f32(0, 8), "b": _f32(0, 8)}, 8, r"tensor 'b': data_offsets \[0, 8\] overlap tensor 'a'"),
    ({"a": _f32(0, 16), "z": {"dtype": "U8", "shape": [0], "data_offsets": [4, 4]}}, 16, r"tensor 'z'.* overlap"),
    ({"a": _f32(0, 8), "b": _f32(12, 20)}, 20, r"tensor 'b': data_offsets \[12, 20\] leave bytes 8\.\.12 after the "
                                               r"end of tensor 'a' covered by no tensor"),
    ({"a": _f32(4, 12)}, 12, r"tensor 'a': data_offsets \[4, 12\] leave bytes 0\.\.4 after the start of the data"),
    ({"a": _f32(0, 8)}, 12, r"the last tensor 'a' ends at byte \d+ but the file has \d+ bytes \(4 trailing bytes"),
    ({}, 4, r"the header \(no tensor data\) ends at byte \d+ but the file has \d+ bytes \(4 trailing"),
    ({"a": _f32(0, 16)}, 8, r"tensor 'a': data ends at byte \d+ but the file has \d+ bytes \(truncated file\)"),
])
def test_refuses_what_safetensors_refuses(tmp_path, header, data_bytes, match):
    path = _with_header(tmp_path / "bad.safetensors", header, b"\0" * data_bytes)
    with pytest.raises(Exception, match="invalid offset|not fully covered"):
        with safe_open(str(path), "pt") as ref:
            [ref.get_tensor(k) for k in ref.keys()]
    with pytest.raises(CheckpointError, match=rf"bad\.safetensors: .*{match}"):
        SafetensorsFile(path)


# ... and files it accepts: any header order, empty tensors sharing an offset, no tensors at all.
@pytest.mark.parametrize("header,data_bytes", [
    ({"b": _f32(8, 16), "a": _f32(0, 8)}, 16),
    ({"e": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, "a": _f32(0, 8),
      "f": {"dtype": "U8", "shape": [2, 0], "data_offsets": [8, 8]}}, 8),
    ({}, 0),
])
def test_accepts_what_safetensors_accepts(tmp_path, header, data_bytes):
    data = bytes(range(data_bytes))
    path = _with_header(tmp_path / "ok.safetensors", header, data)
    f = SafetensorsFile(path)
    with safe_open(str(path), "pt") as ref:
        assert sorted(ref.keys()) == sorted(f.tensors)
        for name in ref.keys():
            assert torch.equal(f.read(name), ref.get_tensor(name)), name


def test_read_rows_over_leading_axes(sample):
    f = SafetensorsFile(sample)
    with safe_open(str(sample), "pt") as ref:
        u8 = ref.get_tensor("u8")  # [4, 3, 16]
        bf16 = ref.get_tensor("bf16")  # [6, 2, 3]
    assert torch.equal(f.read_rows("u8", 1, 3), u8[1:3])
    assert torch.equal(f.read_rows("u8", 5, 11, axes=2), u8.reshape(12, 16)[5:11])
    assert torch.equal(f.read_rows("bf16", 2, 7, axes=3), bf16.reshape(-1)[2:7].reshape(5))
    assert f.read_rows("u8", 2, 2).shape == (0, 3, 16)
    with pytest.raises(IndexError, match=r"tensor 'u8' of shape \[4, 3, 16\]: rows 3:13 out of range 0:12"):
        f.read_rows("u8", 3, 13, axes=2)
    with pytest.raises(IndexError, match=r"tensor 'i64' of shape \[10\]: cannot take rows over its first 2 axes"):
        f.read_rows("i64", 0, 1, axes=2)
