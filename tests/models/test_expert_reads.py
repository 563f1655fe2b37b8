"""MoeCheckpoint.encoded_expert / expert_rows: equal to the decoded expert on every layout, decode only the
rows asked for (FP8 scale-block rows, MXFP4 rows), stream under the memory guard, and refuse NaN weights."""

import pytest
import torch

import lazarus_core.ops
from lazarus_core.models import CheckpointError, open_moe_checkpoint
from lazarus_core.models import checkpoint as checkpoint_module
from lazarus_core.models.checkpoint import _first_fp8_nan
from lazarus_core.models.safetensors_file import SafetensorsFile

LAYOUTS = ["olmoe", "mixtral", "gpt_oss", "gpt_oss_mxfp4", "deepseek_v3_fp8_b16", "deepseek_v3_fp8", "dbrx"]


@pytest.mark.parametrize("name", LAYOUTS)
def test_encoded_and_rows_equal_the_decoded_expert(checkpoint_dir, name):
    ckpt = open_moe_checkpoint(checkpoint_dir(name))
    layer = ckpt.moe_layers[-1]
    for projection in ("gate", "up", "down"):
        out_dim = ckpt.projection_shape(projection)[0]
        for expert in (0, ckpt.num_experts - 1):
            weight = ckpt.expert_weight(layer, projection, expert)
            encoded = ckpt.encoded_expert(layer, projection, expert)
            assert encoded.shape == tuple(weight.shape)
            assert torch.equal(encoded.decode(), weight), (projection, expert)
            for start, stop in ((0, out_dim), (3, 20), (out_dim - 7, out_dim), (5, 5), (17, 18)):
                rows = ckpt.expert_rows(layer, projection, expert, start, stop)
                assert rows.dtype == torch.float32 and rows.is_contiguous()
                assert torch.equal(rows, weight[start:stop]), (projection, expert, start, stop)


def test_rows_out_of_range_name_the_projection(checkpoint_dir):
    ckpt = open_moe_checkpoint(checkpoint_dir("olmoe"))
    out_dim = ckpt.projection_shape("gate")[0]
    for start, stop in ((-1, 2), (4, 3), (0, out_dim + 1)):
        with pytest.raises(IndexError, match=rf"layer 0 gate: rows {start}:{stop} out of range"):
            ckpt.expert_rows(0, "gate", 0, start, stop)
    with pytest.raises(IndexError, match="expert 99 out of range"):
        ckpt.expert_rows(0, "gate", 99, 0, 1)


def _count_decoded(monkeypatch, op_name: str) -> list[int]:
    """Wrap ``lazarus_core.ops.<op_name>``; returns the list of element counts it decodes, call by call."""
    real = getattr(lazarus_core.ops, op_name)
    counts: list[int] = []

    def counting(data, scales, *args, **kwargs):
        result = real(data, scales, *args, **kwargs)
        counts.append(result.numel())
        return result

    monkeypatch.setattr(lazarus_core.ops, op_name, counting)
    return counts


@pytest.mark.parametrize("projection", ["gate", "down"])
def test_fp8_row_chunks_decode_each_block_row_once(checkpoint_dir, monkeypatch, projection):
    ckpt = open_moe_checkpoint(checkpoint_dir("deepseek_v3_fp8_b16"))  # 16 x 16 scale blocks
    layer = ckpt.moe_layers[0]
    out_dim, in_dim = ckpt.projection_shape(projection)
    counts = _count_decoded(monkeypatch, "fp8_dequant")
    # Block-aligned chunks (what the cosine Gram asks for): every element decoded exactly once per expert.
    for start in range(0, out_dim, 16):
        for e in range(ckpt.num_experts):
            ckpt.expert_rows(layer, projection, e, start, min(out_dim, start + 16))
    assert sum(counts) == ckpt.num_experts * out_dim * in_dim
    assert len(counts) == ckpt.num_experts * -(-out_dim // 16)
    # Unaligned chunks decode only from the block row holding `start` to `stop`.
    counts.clear()
    for start, stop in ((5, 9), (15, 17), (out_dim - 3, out_dim)):
        ckpt.expert_rows(layer, projection, 0, start, stop)
        assert counts[-1] == (stop - start // 16 * 16) * in_dim


def test_mxfp4_row_chunks_decode_only_their_rows(checkpoint_dir, monkeypatch):
    ckpt = open_moe_checkpoint(checkpoint_dir("gpt_oss_mxfp4"))
    counts = _count_decoded(monkeypatch, "mxfp4_dequant")
    for projection in ("gate", "up", "down"):
        out_dim, in_dim = ckpt.projection_shape(projection)
        counts.clear()
        for start in range(0, out_dim, 7):
            stop = min(out_dim, start + 7)
            ckpt.expert_rows(1, projection, 3, start, stop)
            assert counts[-1] == (stop - start) * in_dim
        assert sum(counts) == out_dim * in_dim


class _FakeBudget:
    made: list = []

    def __init__(self, budget_bytes, *, trim_first=False):
        self.budget_bytes, self.trim_first, self.enforced = budget_bytes, trim_first, 0
        _FakeBudget.made.append(self)

    def enforce(self):
        self.enforced += 1


def test_per_call_reads_share_one_guard_per_projection(checkpoint_dir, monkeypatch):
    ckpt = open_moe_checkpoint(checkpoint_dir("olmoe"))
    monkeypatch.setattr(checkpoint_module, "ResidentBudget", _FakeBudget)
    _FakeBudget.made = []
    for _ in range(2):  # two passes over the same projection: one stream
        for e in range(ckpt.num_experts):
            ckpt.encoded_expert(0, "gate", e)
    for e in range(ckpt.num_experts):
        ckpt.expert_rows(0, "down", e, 0, 4)
    gate, down = _FakeBudget.made
    out_dim, in_dim = ckpt.projection_shape("gate")
    assert gate.trim_first and gate.budget_bytes == 3 * out_dim * in_dim * 4
    assert gate.enforced == 2 * ckpt.num_experts - 1 and down.enforced == ckpt.num_experts - 1


def _poke(path, tensor: str, flat_index: int, value: int) -> None:
    """Overwrite one byte of ``tensor``'s data in the safetensors file ``path``."""
    start = SafetensorsFile(path).info(tensor).start
    with open(path, "r+b") as f:
        f.seek(start + flat_index)
        f.write(bytes([value]))


def test_mxfp4_nan_scale_names_layer_projection_expert(checkpoint_copy):
    directory = checkpoint_copy("gpt_oss_mxfp4")
    tensor = "model.layers.1.mlp.experts.gate_up_proj_scales"  # [E=4, 2I=64 interleaved rows, H/32=2]
    _poke(directory / "model.safetensors", tensor, (2 * 64 + 2 * 5 + 1) * 2 + 1, 0xFF)  # expert 2, up row 5, group 1
    ckpt = open_moe_checkpoint(directory)
    match = (rf"model\.safetensors: tensor '{tensor}': layer 1, up, expert 2 holds NaN: MXFP4 scale byte 0xFF "
             r"\(NaN in E8M0\) at row 5, columns 32\.\.63")
    for read in (lambda: ckpt.expert_weight(1, "up", 2), lambda: ckpt.encoded_expert(1, "up", 2),
                 lambda: ckpt.expert_rows(1, "up", 2, 4, 6), lambda: list(ckpt.iter_experts(1, "up", reuse=True))):
        with pytest.raises(CheckpointError, match=match):
            read()
    assert torch.isfinite(ckpt.expert_rows(1, "up", 2, 6, 32)).all()  # rows without the NaN block read
    assert torch.isfinite(ckpt.expert_weight(1, "gate", 2)).all()  # the other parity of the same stored rows


def test_fp8_nan_code_and_bad_scale_name_layer_projection_expert(checkpoint_copy):
    directory = checkpoint_copy("deepseek_v3_fp8_b16")
    ckpt = open_moe_checkpoint(directory)
    layer = ckpt.moe_layers[0]
    out_dim, in_dim = ckpt.projection_shape("down")
    name = f"model.layers.{layer}.mlp.experts.3.down_proj.weight"
    _poke(directory / "model.safetensors", name, 37 * in_dim + 11, 0xFF)
    ckpt = open_moe_checkpoint(directory)
    match = rf"tensor '{name}': layer {layer}, down, expert 3 holds NaN: FP8 E4M3 code 0xFF at row 37, column 11"
    for read in (lambda: ckpt.expert_weight(layer, "down", 3), lambda: ckpt.encoded_expert(layer, "down", 3),
                 lambda: ckpt.expert_rows(layer, "down", 3, 36, 40)):
        with pytest.raises(CheckpointError, match=match):
            read()
    assert torch.isfinite(ckpt.expert_rows(layer, "down", 3, 0, 32)).all()  # block rows 0-1 hold no NaN

    scale = f"model.layers.{layer}.mlp.experts.1.gate_proj.weight_scale_inv"  # fp32 [2, 4]
    _poke(directory / "model.safetensors", scale, 4 * 5 + 2, 0xC0)  # block (1, 1), little-endian fp32 0x7FC0....
    _poke(directory / "model.safetensors", scale, 4 * 5 + 3, 0x7F)  # = NaN
    ckpt = open_moe_checkpoint(directory)
    with pytest.raises(CheckpointError, match=rf"tensor '{scale}': layer {layer}, gate, expert 1: block scale nan "
                                              r"at block \(1, 1\)"):
        ckpt.encoded_expert(layer, "gate", 1)


@pytest.mark.parametrize("numel", [1, 37, (1 << 18) - 1, (1 << 18) + 5, 3 * (1 << 18)])
def test_first_fp8_nan_matches_a_plain_scan(numel):
    g = torch.Generator().manual_seed(numel)
    codes = torch.randint(0, 256, (numel,), dtype=torch.uint8, generator=g)
    codes[(codes & 0x7F) == 0x7F] = 0x7E
    assert _first_fp8_nan(codes) is None
    for nan in (0x7F, 0xFF):
        at = int(torch.randint(0, numel, (1,), generator=g))
        planted = codes.clone()
        planted[at] = nan
        planted[min(numel - 1, at + 1)] = 0xFF  # a later NaN never hides the first
        assert _first_fp8_nan(planted) == at
    assert _first_fp8_nan(torch.empty(0, dtype=torch.uint8)) is None
