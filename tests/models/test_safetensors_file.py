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
