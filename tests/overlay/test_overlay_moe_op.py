"""overlay_moe_forward and stored_matmul on every CPU path against their readable references: overlays in
storage precision (fp32/bf16/fp16 factors; fp32/bf16/fp16 or MXFP4 bases), fresh random draws, odd sizes,
T in {0, 1, 3, 17, 300} (the GEMV and the decoded-tile paths, the GEMV and the BLAS shrink), k in {1, 2, 4, 8},
ranks including 0 and 1, both activations, with and without expert biases, and edge values (the integer GEMM
of many rows has test_mxfp4_gemm.py). The MXFP4 GEMV
meets its input rows rounded per block by default (mxfp4_tokens="int16": 16-bit fixed point; "int8" on
request): the strict comparisons run with the fp32 kernel (exact products), the integer kernels are checked
against their readable rounding reference and its bound, and the whole forward of a small batch in one call
against the staged path it replaces."""

from __future__ import annotations

import contextlib


import pytest
import torch

from lazarus_core import BackendUnavailableError
from lazarus_core.ops import mxfp4_quantize, overlay_moe_forward, overlay_moe_forward_reference
from lazarus_core.ops import overlay_moe as op
from tests.overlay.random_overlay import random_overlay, random_routing

CPU_BACKENDS = ["torch", "cpu", "cpu_portable", "triton"]
STORED_BACKENDS = ["torch", "cpu"]
TOKENS = (0, 1, 3, 17, 300)
FACTOR_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _run(backend, x, ids, w, ex):
    if backend == "cpu_portable":  # the host twin of the CUDA arithmetic
        impls = dict(op._IMPLS)
        try:
            op._IMPLS["cpu"] = (op._base_shrink_cpu, lambda *a: op._gate_up_cpu(*a, portable=True),
                                lambda *a: op._down_cpu(*a, portable=True))
            return overlay_moe_forward(x, ids, w, ex, backend="cpu")
        finally:
            op._IMPLS.clear()
            op._IMPLS.update(impls)
    return overlay_moe_forward(x, ids, w, ex, backend=backend)


@pytest.fixture(autouse=True)
def fp32_mxfp4_tokens(monkeypatch):
    """The strict comparisons below hold for the exact fp32 MXFP4 kernel; the integer ones have their own tests."""
    monkeypatch.setattr(op, "MXFP4_TOKENS", "fp32")


def _assert_matches(out: torch.Tensor, x, ids, w, ex, rel_floor: float = 1e-6) -> None:
    """The flash-attention rule: against a float64 oracle on the same stored values, the kernel's error is at
    most twice the fp32 reference's (plus a floor of ``rel_floor`` of the output scale); NaN positions match
    exactly."""
    oracle = overlay_moe_forward_reference(x.double(), ids, w.double(), ex.to_float(torch.float64))
    ref = overlay_moe_forward_reference(x, ids, w, ex).double()
    assert out.shape == oracle.shape and out.dtype == x.dtype
    nan = torch.isnan(oracle)
    assert torch.equal(torch.isnan(out), nan) and torch.equal(torch.isnan(ref), nan)
    out, ref, oracle = (t.double().masked_fill(nan, 0) for t in (out, ref, oracle))
    scale, err, ref_err = (float(t.abs().max()) if t.numel() else 0.0 for t in (oracle, out - oracle, ref - oracle))
    scale = max(1.0, scale)
    assert err <= 2 * ref_err + rel_floor * scale, (err, ref_err, scale)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("tokens,top_k,ranks", [(1, 1, (1, 1, 1)), (7, 2, (3, 5, 2)), (13, 4, (0, 0, 0)),
                                                (5, 8, (4, 1, 0)), (9, 8, (11, 9, 2))],
                         ids=lambda v: str(v).replace(" ", ""))
@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("gpt_oss", True)], ids=["swiglu", "gpt_oss+bias"])
def test_fp32_overlay_matches_reference(backend, tokens, top_k, ranks, activation, bias):
    ex = random_overlay(9, 37, 21, ranks, bias=bias, activation=activation)
    x = torch.randn(tokens, 37) * 2
    ids, w = random_routing(tokens, 9, top_k)
    _assert_matches(_run(backend, x, ids, w, ex), x, ids, w, ex)


# (base, factors): every base format and every factor dtype, each at least twice.
STORAGE = [("fp32", "fp32"), ("fp32", "bf16"), ("bf16", "bf16"), ("bf16", "fp32"), ("fp16", "fp16"), ("mxfp4", "bf16"),
           ("mxfp4", "fp16"), ("mxfp4", "fp32")]


@pytest.mark.parametrize("base,factors", STORAGE, ids=[f"{b}-base-{f}-factors" for b, f in STORAGE])
@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("gpt_oss", True)], ids=["swiglu", "gpt_oss+bias"])
def test_storage_precision_matches_reference(base, factors, activation, bias):
    # MXFP4 needs in % 32 == 0 on both projections; float bases take sizes that are not multiples of 8.
    hidden, inter = (64, 96) if base == "mxfp4" else (37, 21)
    ex = random_overlay(5, hidden, inter, (3, 5, 2), bias=bias, activation=activation,
                        factor_dtype=FACTOR_DTYPES[factors], base=base)
    assert ex.factor_dtype == FACTOR_DTYPES[factors] and ex.base_format == ("mxfp4" if base == "mxfp4" else "float")
    for tokens in TOKENS:  # T=300, k=2 over 5 experts: > SHRINK_MAX_PAIRS pairs per expert (the BLAS shrink)
        x = torch.randn(tokens, hidden) * 2
        ids, w = random_routing(tokens, 5, 2)
        for backend in STORED_BACKENDS:
            _assert_matches(overlay_moe_forward(x, ids, w, ex, backend=backend), x, ids, w, ex)


def test_decoded_tiles_and_gemv_paths_agree(monkeypatch):
    # Many ragged tiles (5 weight rows per tile; with the integer GEMM forbidden, as on a CPU without AVX-512
    # VNNI), the integer GEMM where this CPU has it, and every product through the GEMV kernel.
    ex = random_overlay(3, 64, 32, (2, 3, 1), bias=True, activation="gpt_oss", factor_dtype=torch.bfloat16,
                        base="mxfp4")
    x = torch.randn(40, 64)
    ids, w = random_routing(40, 3, 2)
    monkeypatch.setattr(op, "DECODE_TILE_ROWS", 5)
    with op.cpu_avx512_vnni(False):
        _assert_matches(overlay_moe_forward(x, ids, w, ex, backend="cpu"), x, ids, w, ex)
    _assert_matches(overlay_moe_forward(x, ids, w, ex, backend="cpu"), x, ids, w, ex)
    monkeypatch.setattr(op, "GEMV_MAX_ROWS", 1000)
    monkeypatch.setattr(op, "SHRINK_MAX_PAIRS", 1000)
    _assert_matches(overlay_moe_forward(x, ids, w, ex, backend="cpu"), x, ids, w, ex)


@pytest.mark.parametrize("factors", ["bf16", "fp32"])
@pytest.mark.parametrize("hidden,inter", [(45, 29), (109, 70)])
def test_row_streamed_expand_equals_the_column_blocks(factors, hidden, inter):
    # At most 64 pairs (kRowExpandPairs) the expand stages stream each expert's rank rows over the full width;
    # above, they run by column blocks. The same 5 tokens run among 90 pairs and alone (15 pairs) must give the
    # same bits per pair and per token: ranks with 2- and 4-row passes plus leftovers, widths with a scalar tail
    # (and one-pair experts' 32-column steps with their 8-column and scalar remainders: 109 = 3 * 32 + 8 + 5,
    # 70 = 2 * 32 + 6), 1..7 pairs per expert (tiles of 4 and their remainders).
    n_experts, (rg, ru, rd), top_k = 12, (11, 9, 13), 3
    ex = random_overlay(n_experts, hidden, inter, (rg, ru, rd), bias=True, activation="gpt_oss",
                        factor_dtype=FACTOR_DTYPES[factors])
    ids, w = random_routing(30, n_experts, top_k)
    gu0, s_gu_slot, s_d_slot = torch.randn(30, 2 * inter), torch.randn(90, rg + ru), torch.randn(90, rd)

    def run(tokens):
        r = op._routing(ids[:tokens], w[:tokens], n_experts)
        s_gu, s_d = torch.empty(3 * tokens, rg + ru), torch.empty(3 * tokens, rd)
        s_gu[r.slot_pair], s_d[r.slot_pair] = s_gu_slot[:3 * tokens], s_d_slot[:3 * tokens]
        h, hw, y = torch.empty(3 * tokens, inter), torch.empty(tokens, inter), torch.zeros(tokens, hidden)
        op._gate_up_cpu(gu0[:tokens].contiguous(), s_gu, r, ex, h, hw)
        op._down_cpu(s_d, r, ex, y)
        return h[r.slot_pair], hw, y

    h_all, hw_all, y_all = run(30)
    h_few, hw_few, y_few = run(5)
    assert torch.equal(h_all[:15], h_few) and torch.equal(hw_all[:5], hw_few) and torch.equal(y_all[:5], y_few)
    r = op._routing(ids, w, n_experts)  # and the column blocks against the readable torch stages
    s_d = torch.empty(90, rd)
    s_d[r.slot_pair] = s_d_slot
    y_ref = torch.zeros(30, hidden)
    op._down_torch(s_d, r, ex, y_ref)
    torch.testing.assert_close(y_all, y_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("base", ["fp32", "mxfp4"])
def test_reference_equals_full_weights(base):
    # The reference never forms W_e; check it against the dense expert MLP on reconstructed weights.
    hidden, inter = (64, 32) if base == "mxfp4" else (19, 11)
    ex = random_overlay(5, hidden, inter, (2, 3, 4), bias=True, activation="gpt_oss", base=base,
                        factor_dtype=torch.float32 if base == "fp32" else torch.bfloat16)
    x = torch.randn(6, hidden)
    ids, w = random_routing(6, 5, 3)
    wg, wu, wd = (ex.reconstruct(p) for p in ("gate", "up", "down"))
    bg, bu, bd = (b.float() for b in (ex.bias_gate, ex.bias_up, ex.bias_down))
    expected = torch.zeros(6, hidden)
    for t in range(6):
        for k in range(3):
            e = int(ids[t, k])
            g, u = wg[e] @ x[t] + bg[e], wu[e] @ x[t] + bu[e]
            g, u = g.clamp(max=7.0), u.clamp(-7.0, 7.0)
            h = g * torch.sigmoid(1.702 * g) * (u + 1)
            expected[t] += w[t, k] * (wd[e] @ h + bd[e])
    torch.testing.assert_close(overlay_moe_forward_reference(x, ids, w, ex), expected, atol=1e-4, rtol=1e-4)


def test_gpt_oss_clamp_edges_and_repeated_expert():
    # Large inputs drive gate/up past the clamp limit; one expert chosen by every token (a long group).
    ex = random_overlay(3, 33, 17, (2, 2, 2), bias=True, activation="gpt_oss", scale=2.0)
    x = torch.randn(11, 33) * 10
    ids = torch.tensor([[1, 0]] * 11)
    w = torch.rand(11, 2)
    for backend in ("cpu", "torch", "triton"):
        _assert_matches(_run(backend, x, ids, w, ex), x, ids, w, ex)


@pytest.mark.parametrize("factors", ["bf16", "fp32"])
def test_edge_values(factors):
    fdt = FACTOR_DTYPES[factors]
    ex = random_overlay(4, 64, 32, (3, 2, 2), bias=True, activation="gpt_oss", factor_dtype=fdt, base="mxfp4")
    # bf16 extremes: gate/up biases at +-bf16 max (clamped to +-limit), factors of one expert at the smallest
    # bf16 subnormal, another expert all zero; duplicate experts per token; zero routing weights.
    big = torch.finfo(torch.bfloat16).max
    ex.bias_gate[0].fill_(big)
    ex.bias_up[0].fill_(-big)
    ex.bias_gate[1, ::2] = -big
    tiny = torch.tensor(2.0 ** -133).to(fdt)  # the smallest positive bf16 subnormal
    for t in (ex.b_gate_up, ex.at_gate, ex.at_up, ex.b_down, ex.at_down):
        t[2].fill_(tiny)
        t[3].zero_()
    ids = torch.tensor([[0, 0], [1, 2], [3, 3], [2, 1], [0, 3]])
    w = torch.tensor([[0.5, 0.5], [0.0, 1.0], [0.3, 0.0], [0.0, 0.0], [1.0, 2.0]])
    x = torch.randn(5, 64)
    for backend in STORED_BACKENDS:
        out = overlay_moe_forward(x, ids, w, ex, backend=backend)
        assert torch.isfinite(out).all()
        _assert_matches(out, x, ids, w, ex)
        assert torch.equal(out[3], torch.zeros(64))  # both weights zero: exactly nothing


def test_zero_rank_and_zero_experts_weights():
    ex = random_overlay(3, 37, 21, (0, 0, 0), bias=False, activation="swiglu", factor_dtype=torch.bfloat16,
                        base="bf16")
    x = torch.randn(4, 37)
    ids, w = random_routing(4, 3, 2)
    for backend in STORED_BACKENDS:
        _assert_matches(overlay_moe_forward(x, ids, w, ex, backend=backend), x, ids, w, ex)


def test_gpt_oss_clamp_propagates_nan():
    # transformers' GPT-OSS experts clamp with torch.clamp, which keeps NaN: a NaN token stays NaN (an activation
    # that clamps NaN to +-limit returns a finite row), and the other tokens are untouched.
    ex = random_overlay(4, 64, 32, (2, 2, 2), bias=True, activation="gpt_oss", factor_dtype=torch.bfloat16,
                        base="mxfp4")
    x = torch.randn(3, 64)
    x[1, 5] = float("nan")
    ids, w = random_routing(3, 4, 2)
    for backend in STORED_BACKENDS:
        out = overlay_moe_forward(x, ids, w, ex, backend=backend)
        assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()
        _assert_matches(out, x, ids, w, ex)
    # NaN only in the gate bias of expert 2: the pairs routed there, and nothing else.
    ex.bias_gate[2, 3] = float("nan")
    x = torch.randn(3, 64)
    ids = torch.tensor([[2, 0], [1, 0], [3, 1]])
    for backend in STORED_BACKENDS:
        out = overlay_moe_forward(x, ids, w, ex, backend=backend)
        assert torch.isnan(out[0]).all() and torch.isfinite(out[1:]).all()
        _assert_matches(out, x, ids, w, ex)


@pytest.mark.parametrize("mode", ["int16", "int8"])
def test_one_call_rounds_hw_block_by_block(mode):
    # The one-call forward (T <= 16) rounds hw for the down product block by block, as each column block of the
    # activation finishes it (two blocks here: I = 288 = 256 + 32), in both expand forms: 72 pairs run by column
    # blocks, 15 by rows; both match the oracle within the token rounding. A NaN token leaves the rounded rows
    # unused, so that batch runs the fp32 kernel (NaN propagates, the other tokens stay finite and close).
    ex = random_overlay(12, 64, 288, (3, 2, 4), bias=True, activation="gpt_oss", factor_dtype=torch.bfloat16,
                        base="mxfp4")
    x = torch.randn(12, 64)
    ids, w = random_routing(12, 12, 6)
    rel = {"int16": 2.0 ** -10, "int8": 2.0 ** -4}[mode]
    with op.mxfp4_token_mode(mode):
        many = overlay_moe_forward(x, ids, w, ex, backend="cpu")
        few = overlay_moe_forward(x[:5], ids[:5], w[:5].contiguous(), ex, backend="cpu")
        _assert_matches(many, x, ids, w, ex, rel_floor=rel)
        _assert_matches(few, x[:5], ids[:5], w[:5], ex, rel_floor=rel)
        x[3, 7] = float("nan")
        out = overlay_moe_forward(x, ids, w, ex, backend="cpu")
    assert torch.isnan(out[3]).all() and int(torch.isnan(out).sum()) == 64
    _assert_matches(out, x, ids, w, ex, rel_floor=1e-6)


def test_mxfp4_nan_scale_in_the_base():
    ex = random_overlay(3, 64, 32, (1, 1, 1), bias=False, activation="swiglu", factor_dtype=torch.bfloat16,
                        base="mxfp4")
    ex.base_down_scales[7, 0] = 0xFF  # row 7 of the down base: output column 7 of every token is NaN
    ex.base_down_scales[9, 0] = 0     # 2^-127, a subnormal scale, kept
    for tokens in (2, 20):            # the GEMV and the decoded-tile paths
        x = torch.randn(tokens, 64)
        ids, w = random_routing(tokens, 3, 2)
        for backend in STORED_BACKENDS:
            out = overlay_moe_forward(x, ids, w, ex, backend=backend)
            assert torch.isnan(out[:, 7]).all() and int(torch.isnan(out).sum()) == tokens
            _assert_matches(out, x, ids, w, ex)


def test_layout_keeps_storage_precision_and_counts_stored_bytes():
    e, h, i, (rg, ru, rd) = 3, 64, 96, (2, 3, 4)
    ex = random_overlay(e, h, i, (rg, ru, rd), bias=True, activation="gpt_oss", factor_dtype=torch.bfloat16,
                        base="mxfp4")
    assert ex.base_gate_up is None and ex.base_down is None
    assert ex.base_gate_up_blocks.dtype == torch.uint8 and ex.base_gate_up_blocks.shape == (2 * i, h // 32, 16)
    assert ex.base_down_scales.shape == (h, i // 32)
    assert {t.dtype for n, t in ex.tensors().items() if not n.startswith("base_")} == {torch.bfloat16}
    base_bytes = (2 * i * h + h * i) * 17 // 32                       # 4.25 bits per value
    factor_bytes = 2 * e * ((rg + ru) * h + rg * i + ru * i + rd * i + rd * h + 2 * i + h)
    assert ex.nbytes() == base_bytes + factor_bytes
    assert (ex.hidden_size, ex.intermediate_size, ex.num_experts) == (h, i, e)
    assert ex.ranks == {"gate": rg, "up": ru, "down": rd}
    fp32 = ex.to_float()
    assert fp32.base_format == "float" and fp32.b_gate_up.dtype == torch.float32
    torch.testing.assert_close(fp32.base_gate_up, ex.base_fp32("gate_up"), atol=0, rtol=0)
    for p in ("gate", "up", "down"):
        torch.testing.assert_close(fp32.reconstruct(p), ex.reconstruct(p), atol=0, rtol=0)


def test_load_overlay_layers_keeps_the_stored_dtypes(checkpoint_dir, tmp_path):
    from lazarus_core.models import open_moe_checkpoint
    from lazarus_core.overlay import load_overlay_layers, make_policy, plan_overlay, read_config, write_overlay
    from lazarus_core.overlay.verify import overlay_bytes_on_disk

    model = str(checkpoint_dir("gpt_oss_mxfp4"))
    ckpt = open_moe_checkpoint(model)
    plan = plan_overlay(ckpt, list(ckpt.moe_layers), make_policy(rank=2), dtype="bf16", base_dtype="mxfp4",
                        base_method="mean")
    write_overlay(ckpt, tmp_path / "ov", plan, model=model)
    layers = load_overlay_layers(tmp_path / "ov")
    assert set(layers) == set(ckpt.moe_layers)
    for ex in layers.values():
        assert ex.base_format == "mxfp4" and ex.factor_dtype == torch.bfloat16
    # As many bytes in memory as in the shards: nothing expanded.
    assert sum(ex.nbytes() for ex in layers.values()) == overlay_bytes_on_disk(tmp_path / "ov",
                                                                               read_config(tmp_path / "ov"))


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp16", "mxfp4"])
def test_stored_matmul_matches_reference(fmt, monkeypatch):
    monkeypatch.setattr(op, "DECODE_TILE_ROWS", 7)  # ragged tiles on the large-n path
    rows, cols = (19, 96) if fmt == "mxfp4" else (19, 37)
    w = torch.randn(rows, cols)
    kw = dict(zip(("blocks", "scales"), mxfp4_quantize(w))) if fmt == "mxfp4" else {"w": w.to(FACTOR_DTYPES[fmt])}
    if fmt == "mxfp4":
        kw["scales"][3, 1] = 0xFF  # a NaN block: row 3 of every output is NaN
        kw["scales"][4, 0] = 0     # a subnormal scale
    for n in (0, 1, 2, 3, 4, 5, 17, 40):
        x = torch.randn(n, cols)
        ref = op.stored_matmul_reference(x, **kw)
        out = op.stored_matmul(x, **kw)
        oracle = x.double() @ op.stored_matmul_reference(torch.eye(cols), **kw).double()
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, equal_nan=True)
        if n:
            err, ref_err = ((t.double() - oracle).nan_to_num().abs().max() for t in (out, ref))
            assert err <= 2 * ref_err + 1e-6 * max(1.0, float(oracle.nan_to_num().abs().max()))


def test_bad_inputs_name_the_argument():
    ex = random_overlay(4, 16, 8, (1, 1, 1), bias=False, activation="swiglu")
    x = torch.randn(3, 16)
    ids, w = random_routing(3, 4, 2)
    with pytest.raises(ValueError, match="x must be"):
        overlay_moe_forward(torch.randn(3, 15), ids, w, ex)
    with pytest.raises(ValueError, match="topk_ids must be in"):
        overlay_moe_forward(x, ids + 4, w, ex)
    with pytest.raises(ValueError, match="topk_weights"):
        overlay_moe_forward(x, ids, w[:, :1], ex)
    with pytest.raises(TypeError, match="topk_ids must be an integer"):
        overlay_moe_forward(x, ids.float(), w, ex)
    with pytest.raises(ValueError, match="backend must be one of"):
        overlay_moe_forward(x, ids, w, ex, backend="nope")
    base = {"gate": torch.zeros(8, 16), "up": torch.zeros(8, 16), "down": torch.zeros(16, 8)}
    a = {"gate": torch.zeros(4, 8, 1), "up": torch.zeros(4, 8, 1), "down": torch.zeros(4, 16, 1)}
    b = {"gate": torch.zeros(4, 1, 16), "up": torch.zeros(4, 1, 16), "down": torch.zeros(4, 1, 8)}
    with pytest.raises(ValueError, match="up.A has shape"):
        op.OverlayExperts.from_factors(base, {**a, "up": torch.zeros(4, 9, 1)}, b)
    with pytest.raises(ValueError, match="every base must be float or every base MXFP4"):
        op.OverlayExperts.from_factors({**base, "down": mxfp4_quantize(torch.zeros(16, 32))}, a, b)
    packed = {"gate": mxfp4_quantize(torch.zeros(8, 32)), "up": mxfp4_quantize(torch.zeros(8, 32)),
              "down": mxfp4_quantize(torch.zeros(32, 32))}
    with pytest.raises(ValueError, match="in % 32 == 0"):  # down's input (I = 8) cannot hold MXFP4 blocks
        op.OverlayExperts.from_factors(packed, {**a, "down": torch.zeros(4, 32, 1)},
                                       {**b, "gate": torch.zeros(4, 1, 32), "up": torch.zeros(4, 1, 32)})
    with pytest.raises(ValueError, match="either a float weight"):
        op.stored_matmul(x, torch.zeros(4, 16), blocks=torch.zeros(4, 1, 16, dtype=torch.uint8))
    with pytest.raises(TypeError, match="w must be a 2-D"):
        op.stored_matmul(x, torch.zeros(4, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="x must be"):
        op.stored_matmul(x, torch.zeros(4, 15))


def test_cpu_binding_rejects_bad_offsets_and_indices():
    from lazarus_core.ops._backends import cpu_extension

    ext = cpu_extension()
    ex = random_overlay(2, 8, 4, (1, 1, 1), bias=False, activation="swiglu")
    gu0, s = torch.zeros(1, 8), torch.zeros(1, 2)
    h, hw = torch.zeros(1, 4), torch.zeros(1, 4)
    bad_offsets = torch.tensor([0, 2, 1], dtype=torch.int64)
    with pytest.raises(ValueError, match="offsets"):
        ext.overlay_gate_up(gu0.numpy(), s.numpy(), torch.zeros(1, dtype=torch.int64).numpy(), torch.ones(1).numpy(),
                            bad_offsets.numpy(), ex.at_gate.numpy(), ex.at_up.numpy(), None, None, 0, 1.0, 7.0,
                            h.numpy(), hw.numpy())
    with pytest.raises(ValueError, match="pair_token"):
        ext.overlay_gate_up(gu0.numpy(), s.numpy(), torch.tensor([5]).numpy(), torch.ones(1).numpy(),
                            torch.tensor([0, 1, 1]).numpy(), ex.at_gate.numpy(), ex.at_up.numpy(), None, None, 0, 1.0,
                            7.0, h.numpy(), hw.numpy())
    with pytest.raises(TypeError, match="at_gate must hold 16-bit"):  # fp32 factors announced as bf16
        ext.overlay_gate_up(gu0.numpy(), s.numpy(), torch.zeros(1, dtype=torch.int64).numpy(), torch.ones(1).numpy(),
                            torch.tensor([0, 1, 1]).numpy(), ex.at_gate.numpy(), ex.at_up.numpy(), None, None, 0, 1.0,
                            7.0, h.numpy(), hw.numpy(), 1)
    w, x, y = torch.zeros(3, 8), torch.zeros(2, 8), torch.zeros(1, 3)
    with pytest.raises(ValueError, match="x_rows holds an index out of range"):
        ext.stored_matvec(w.numpy(), None, 0, 3, 8, x.numpy(), torch.tensor([2]).numpy(), y.numpy())
    with pytest.raises(ValueError, match="cols % 32"):
        ext.stored_matvec(torch.zeros(3, 4, dtype=torch.uint8).numpy(), torch.zeros(3, dtype=torch.uint8).numpy(),
                          3, 3, 8, x.numpy(), None, y.numpy())
    with pytest.raises(ValueError, match="rows holds an index out of range"):
        ext.overlay_shrink(ex.b_down.numpy(), 0, 2, 1, 4, torch.tensor([0, 1, 1]).numpy(), 16,
                           torch.zeros(1, 4).numpy(), torch.tensor([1]).numpy(), torch.zeros(1, 1).numpy())


def test_zero_tokens_and_bf16_input():
    ex = random_overlay(4, 16, 8, (1, 1, 1), bias=False, activation="swiglu", factor_dtype=torch.bfloat16)
    out = overlay_moe_forward(torch.empty(0, 16), torch.empty(0, 2, dtype=torch.int64), torch.empty(0, 2), ex)
    assert out.shape == (0, 16)
    x = torch.randn(3, 16).to(torch.bfloat16)
    ids, w = random_routing(3, 4, 2)
    out = overlay_moe_forward(x, ids, w, ex, backend="cpu")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), overlay_moe_forward_reference(x.float(), ids, w, ex), atol=0.05, rtol=0.02)


def test_cuda_backend_unavailable_here_is_explicit():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    ex = random_overlay(2, 8, 4, (1, 1, 1), bias=False, activation="swiglu")
    ids, w = random_routing(1, 2, 1)
    with pytest.raises((BackendUnavailableError, ValueError)):
        overlay_moe_forward(torch.randn(1, 8), ids, w, ex, backend="cuda")


@pytest.mark.parametrize("base", ["bf16", "mxfp4"])
def test_matvec_and_shrink_in_one_region_match_the_separate_kernels(base):
    # The combined kernel of a small batch's stage: the base GEMV and the grouped shrink (odd rank, ragged groups,
    # an expert above max_pairs left untouched, one with no pairs) equal the two kernels run one after the other.
    from lazarus_core.ops._backends import cpu_extension

    ext = cpu_extension()
    rows, cols, experts, rank, b_cols = 21, 64, 4, 5, 37
    w = torch.randn(rows, cols)
    if base == "mxfp4":
        blocks, scales = mxfp4_quantize(w)
        data, sc, fmt = blocks.numpy(), scales.numpy(), 3
    else:
        data, sc, fmt = op._bits(w.to(torch.bfloat16)), None, 1
    x = torch.randn(6, cols)
    x_rows = torch.tensor([5, 0, 3], dtype=torch.int64)
    b = torch.randn(experts, rank, b_cols).to(torch.bfloat16)
    offsets = torch.tensor([0, 2, 2, 9, 10], dtype=torch.int64)  # expert 2 has 7 pairs > max_pairs = 6
    inp = torch.randn(12, b_cols)
    inp_rows = torch.randint(0, 12, (10,), dtype=torch.int64)
    y, s = torch.full((3, rows), float("nan")), torch.full((10, rank), -1.0)
    ext.stored_matvec_and_shrink(data, sc, fmt, rows, cols, x.numpy(), x_rows.numpy(), y.numpy(), op._bits(b), 1,
                                 experts, rank, b_cols, offsets.numpy(), 6, inp.numpy(), inp_rows.numpy(), s.numpy())
    y_ref, s_ref = torch.empty(3, rows), torch.full((10, rank), -1.0)
    ext.stored_matvec(data, sc, fmt, rows, cols, x.numpy(), x_rows.numpy(), y_ref.numpy())
    ext.overlay_shrink(op._bits(b), 1, experts, rank, b_cols, offsets.numpy(), 6, inp.numpy(), inp_rows.numpy(),
                       s_ref.numpy())
    assert torch.equal(y, y_ref) and torch.equal(s, s_ref)
    assert torch.equal(s[2:9], torch.full((7, rank), -1.0))  # above max_pairs: untouched
    oracle = (inp[inp_rows].double()[:2] @ b[0].double().T)
    torch.testing.assert_close(s[:2].double(), oracle, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="rows holds an index out of range"):
        ext.stored_matvec_and_shrink(data, sc, fmt, rows, cols, x.numpy(), x_rows.numpy(), y.numpy(), op._bits(b), 1,
                                     experts, rank, b_cols, offsets.numpy(), 6, inp.numpy(),
                                     (inp_rows + 12).numpy(), s.numpy())


# ---- the integer MXFP4 kernels (int16 the default, int8) and the one-call forward of a small batch

# Each element's rounding error, as a fraction of its block's largest |x| (mxfp4_token_rounding's contract).
ROUNDING_BOUND = {"int16": 2.0 ** -14, "int8": (1 + 1e-5) / 254}


def _mxfp4_weight(rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(zip(("blocks", "scales"), mxfp4_quantize(torch.randn(rows, cols, generator=g))))


def _block_max(x):
    n, cols = x.shape
    return x.abs().reshape(n, cols // 32, 32).amax(-1, keepdim=True).expand(n, cols // 32, 32).reshape(n, cols)


@pytest.mark.parametrize("mode", ["int16", "int8"])
def test_token_rounding_reference_keeps_its_bound(mode):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 128, generator=g) * torch.logspace(-30, 30, 6)[:, None]
    x[0, :32] = 0.0                      # an all-zero block
    x[1, 40] = 1e4 * x[1, 32:64].abs().max()  # one large value: the block's others lose relative precision
    x[2, 96:] = torch.randn(32, generator=g) * 1e-38  # a block near the bottom of fp32 (int16: k capped at 127)
    r = op.mxfp4_token_rounding(x, mode)
    assert r.dtype == torch.float64
    assert ((r - x.double()).abs() <= ROUNDING_BOUND[mode] * _block_max(x).double()).all()
    assert torch.equal(r[0, :32], torch.zeros(32, dtype=torch.float64))
    assert (r != x.double()).any()       # it does round
    bad = x.clone()
    bad[2, 7] = float("inf")
    assert torch.equal(op.mxfp4_token_rounding(bad, mode), bad.double())  # inf anywhere: the fp32 kernel runs
    with pytest.raises(ValueError, match="mode"):
        op.mxfp4_token_rounding(x, "fp32")


HAS_VNNI = op.cpu_extension().cpu_has_ymm_vnni()          # AVX-VNNI, or AVX-512 VNNI's EVEX ymm vpdpbusd
HAS_AVX512_VNNI = op.cpu_extension().cpu_has_avx512_vnni()  # Zen 4 and Ice Lake have it without AVX-VNNI
HAS_AVX512_VBMI = op.cpu_extension().cpu_has_avx512_vbmi()  # the zmm form's vpermb decode (not Cascade Lake)
# The integer kernel's forms: AVX2, and the ymm VNNI and the zmm ones (shuffle and vpermb decode) where this CPU
# has them.
INTEGER_FORMS = (["avx2"] + (["avx_vnni"] if HAS_VNNI else []) + (["avx512_vnni"] if HAS_AVX512_VNNI else [])
                 + (["avx512_vbmi"] if HAS_AVX512_VBMI else []))


@contextlib.contextmanager
def integer_form(form):
    """Run the block with the integer MXFP4 kernel in ``form`` (one of INTEGER_FORMS)."""
    with (op.cpu_avx_vnni(form != "avx2"), op.cpu_avx512_vnni(form.startswith("avx512")),
          op.cpu_avx512_vbmi(form == "avx512_vbmi")):
        yield


@pytest.mark.parametrize("form", INTEGER_FORMS)
@pytest.mark.parametrize("mode", ["int16", "int8"])
@pytest.mark.parametrize("n,cols", [(1, 160), (2, 352), (3, 160), (4, 2880), (5, 352), (9, 32), (16, 288)])
def test_integer_kernel_equals_its_rounding_reference(mode, n, cols, form):
    # Products and block sums are exact in integers: the kernel equals the fp64 product of the rounded rows up
    # to the fp32 sum over blocks. Odd block counts (a half-loaded last pair), groups of 8 blocks and a tail,
    # odd row counts, n over the 4 tokens per pass. A weight row with a NaN scale and one with a zero scale
    # byte run the fp32 kernel on the unrounded rows; blocks far below the others and near fp32's bottom.
    rows = 21
    kw = _mxfp4_weight(rows, cols, seed=n)
    kw["scales"][3, 0] = 0xFF
    kw["scales"][4, -1] = 0
    x = torch.randn(n, cols) * 3
    x[:, :32] *= 1e-20                   # a block far below the others
    if cols >= 96:
        x[:, 64:96] = torch.randn(n, 32) * 1e-38
    x[0, -32:] += 5.0                    # a block far from zero mean (the +12 code offset is subtracted exactly)
    with integer_form(form):
        out = op.stored_matmul(x, **kw, mxfp4_tokens=mode)
    assert_rounding_oracle(out, x, kw, mode)


def assert_rounding_oracle(out, x, kw, mode):
    """``out`` is the fp64 product of the rounded rows up to the fp32 sum over blocks, for a weight whose row 3
    holds a NaN scale byte (NaN there only) and row 4 a zero one (the fp32 kernel on the unrounded rows); and
    the rounding keeps its bound. Returns ``(out, oracle, exact)`` in fp64, NaN set to 0, and the scale."""
    dense = op.stored_matmul_reference(torch.eye(x.shape[1]), **kw).double()   # [in, out] decoded weights
    out, exact = out.double(), x.double() @ dense
    oracle = op.mxfp4_token_rounding(x, mode) @ dense
    oracle[:, 4] = exact[:, 4]          # the zero-scale row: fp32 kernel, unrounded rows
    nan = torch.isnan(oracle)
    assert torch.equal(torch.isnan(out), nan) and nan[:, 3].all() and int(nan.sum()) == x.shape[0]
    out, oracle, exact = (t.masked_fill(nan, 0) for t in (out, oracle, exact))
    scale = float(oracle.abs().max())
    assert float((out - oracle).abs().max()) <= 1e-6 * scale
    bound = ROUNDING_BOUND[mode] * _block_max(x).double()
    assert ((exact - oracle).abs() <= bound @ dense.abs().nan_to_num() + 1e-6 * scale).all()
    return out, oracle, exact, scale


@pytest.mark.skipif(not HAS_AVX512_VNNI, reason="needs AVX-512 VNNI")
@pytest.mark.parametrize("activation", ["swiglu", "gpt_oss"])
def test_zmm_activation_equals_the_ymm_one_on_edge_values(activation):
    # With AVX-512 the activation runs 16 columns per step (the last 1..15 in ymm); per column it keeps the ymm
    # form's operations, so the same bits, at the edges too: exp's underflow and overflow clamps, the GPT-OSS limit,
    # zeros, infinities and NaN (which propagates). 37 columns: two zmm steps and a ymm tail with a scalar rest.
    inter, tokens, n_experts = 37, 4, 5
    ex = random_overlay(n_experts, 16, inter, (3, 2, 2), bias=True, activation=activation)
    ids, w = random_routing(tokens, n_experts, 2)
    g = torch.Generator().manual_seed(7)
    gu0 = torch.randn(tokens, 2 * inter, generator=g) * 40
    edges = torch.tensor([0.0, -0.0, 88.0, -88.0, 100.0, -100.0, 7.0, -7.0, 1e30, -1e30, float("inf"),
                          float("-inf"), float("nan")])
    gu0.view(-1)[torch.randperm(gu0.numel(), generator=g)[:3 * edges.numel()]] = edges.repeat(3)
    r = op._routing(ids, w, n_experts)
    s_gu = torch.randn(2 * tokens, 5, generator=g)

    def run():
        h, hw = torch.empty(2 * tokens, inter), torch.empty(tokens, inter)
        op._gate_up_cpu(gu0, s_gu, r, ex, h, hw)
        return h, hw

    zmm = run()
    with op.cpu_avx512_vnni(False):
        ymm = run()
    for a, b in zip(zmm, ymm):
        assert torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(), b.nan_to_num())
    assert torch.isnan(zmm[0]).any() and torch.isfinite(zmm[0]).any()  # the edges reached the activation


@pytest.mark.skipif(not HAS_AVX512_VNNI, reason="needs AVX-512 VNNI")
@pytest.mark.parametrize("factors", ["bf16", "fp16", "fp32"])
def test_zmm_factor_kernels_equal_the_ymm_ones(factors):
    # At T <= 16 with AVX-512 the expand passes and the one-token shrink rows run in zmm registers; per output
    # they keep the ymm forms' operations and order, so the forward gives the same bits with the AVX-512 forms
    # forbidden. Widths leave 8-column steps and scalar tails (45 = 2 * 16 + 8 + 5, 29 = 16 + 8 + 5), ranks
    # leave passes of 2, 4 and 1 rows; T = 1 (one pair per expert) and T = 6 (several).
    for base, hidden, inter in (("bf16", 45, 29), ("mxfp4", 96, 160)):
        ex = random_overlay(6, hidden, inter, (11, 9, 13), bias=True, activation="gpt_oss",
                            factor_dtype=FACTOR_DTYPES[factors], base=base)
        for tokens in (1, 6):
            x = torch.randn(tokens, hidden)
            ids, w = random_routing(tokens, 6, 3)
            zmm = overlay_moe_forward(x, ids, w, ex, backend="cpu")
            with op.cpu_avx512_vnni(False):
                ymm = overlay_moe_forward(x, ids, w, ex, backend="cpu")
            assert torch.equal(zmm, ymm), (base, tokens)
            _assert_matches(zmm, x, ids, w, ex, rel_floor=2.0 ** -10 if base == "mxfp4" else 1e-6)


@pytest.mark.skipif(not HAS_VNNI, reason="this CPU has no AVX-VNNI: only the AVX2 form runs")
@pytest.mark.parametrize("form", INTEGER_FORMS[1:])
@pytest.mark.parametrize("mode", ["int16", "int8"])
def test_vnni_forms_equal_the_avx2_form(mode, form):
    # The same integers, then the same fp32 FMAs in the same order per lane (the AVX-512 form's low and high
    # halves are the ymm forms' even- and odd-pair accumulators): bit for bit, over fresh draws at odd sizes (a
    # half pair, a pair past the end of a two-pair step, a tail of scales, 1 to 7 tokens per pass), values far
    # from zero mean (the code offset), an all-zero block and a weight row with a NaN scale byte. One token in the
    # AVX-512 form takes 4 or 2 rows per pass, then single rows: the NaN row leaves runs of 18 and 18 rows at 37,
    # of 4 and 4 at 9, and of 3 and 3 at 7 (a pair, then a single row).
    g = torch.Generator().manual_seed(11)
    for n, rows, cols in [(1, 37, 2880), (2, 5, 96), (3, 9, 352), (5, 17, 32), (7, 3, 800), (4, 6, 64),
                          (1, 9, 224), (2, 4, 256), (3, 7, 160), (1, 7, 352)]:
        kw = _mxfp4_weight(rows, cols, seed=n)
        kw["scales"][rows // 2, -1] = 0xFF
        x = torch.randn(n, cols, generator=g) * torch.logspace(-3, 3, n)[:, None]
        x[0, -32:] += 7.0
        x[-1, :32] = 0.0
        with integer_form("avx2"):
            ref = op.stored_matmul(x, **kw, mxfp4_tokens=mode)
        with integer_form(form):
            out = op.stored_matmul(x, **kw, mxfp4_tokens=mode)
        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True, msg=str((n, rows, cols)))
        assert torch.isnan(out[:, rows // 2]).all()
    ext = op.cpu_extension()
    assert ext.set_avx_vnni(True) is True and ext.set_avx512_vnni(True) is True  # the defaults were restored
    assert ext.set_avx512_vbmi(True) is True


@pytest.mark.parametrize("form", INTEGER_FORMS[1:])
def test_vnni_forward_at_one_token_equals_the_avx2_forward(form):
    ex = random_overlay(8, 128, 64, (4, 6, 3), bias=True, activation="gpt_oss", factor_dtype=torch.bfloat16,
                        base="mxfp4")
    x = torch.randn(1, 128)
    ids, w = random_routing(1, 8, 4)
    with op.mxfp4_token_mode("int16"):
        with integer_form("avx2"):
            ref = overlay_moe_forward(x, ids, w, ex, backend="cpu")
        with integer_form(form):
            out = overlay_moe_forward(x, ids, w, ex, backend="cpu")
    assert torch.equal(out, ref)


@pytest.mark.parametrize("mode", ["int16", "int8"])
def test_integer_kernel_runs_fp32_when_a_row_is_not_finite(mode):
    kw = _mxfp4_weight(9, 64)
    x = torch.randn(3, 64)
    x[1, 2] = float("inf")
    x[2, 5] = float("nan")
    a = op.stored_matmul(x, **kw, mxfp4_tokens=mode)
    b = op.stored_matmul(x, **kw, mxfp4_tokens="fp32")
    assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(torch.isnan(a), torch.isnan(b))
    with pytest.raises(ValueError, match="mxfp4_tokens"):
        op.stored_matmul(x, **kw, mxfp4_tokens="int4")


def test_mxfp4_token_mode_sets_and_restores():
    kw = _mxfp4_weight(8, 64)
    x = torch.randn(2, 64)
    default = op.MXFP4_TOKENS
    with op.mxfp4_token_mode("int8"):
        assert op.MXFP4_TOKENS == "int8"
        assert torch.equal(op.stored_matmul(x, **kw), op.stored_matmul(x, **kw, mxfp4_tokens="int8"))
    assert op.MXFP4_TOKENS == default
    with pytest.raises(RuntimeError), op.mxfp4_token_mode("int16"):
        raise RuntimeError("inside")
    assert op.MXFP4_TOKENS == default     # restored after an exception too
    with op.mxfp4_token_mode(None):
        assert op.MXFP4_TOKENS == default
    with pytest.raises(ValueError, match="mxfp4_tokens"), op.mxfp4_token_mode("int4"):
        pass


def test_integer_modes_order_by_precision():
    # int16 is far closer to the exact product than int8, and int8 still tracks it (a wrong kernel would not).
    kw = _mxfp4_weight(64, 2880, seed=5)
    x = torch.randn(4, 2880, generator=torch.Generator().manual_seed(6))
    exact = op.stored_matmul(x, **kw, mxfp4_tokens="fp32").double()
    err = {m: float((op.stored_matmul(x, **kw, mxfp4_tokens=m).double() - exact).abs().max()) / float(exact.abs().max())
           for m in ("int16", "int8")}
    assert err["int16"] < 2e-4 and err["int8"] < 2e-2 and err["int16"] < err["int8"] / 10


def _staged(x, ids, w, ex):
    """The staged CPU forward (one call per stage), which T <= GEMV_MAX_ROWS no longer takes."""
    impls = dict(op._IMPLS)
    try:
        op._IMPLS["cpu"] = tuple(op._CPU_STAGES)  # equal stages, another tuple: not the one-call path
        return overlay_moe_forward(x, ids, w, ex, backend="cpu")
    finally:
        op._IMPLS.clear()
        op._IMPLS.update(impls)


@pytest.mark.parametrize("mode", ["int16", "int8", "fp32"])
@pytest.mark.parametrize("base,factors", STORAGE, ids=[f"{b}-base-{f}-factors" for b, f in STORAGE])
@pytest.mark.parametrize("tokens,top_k", [(1, 1), (1, 4), (3, 2), (16, 8)])
def test_one_call_forward_equals_the_staged_path(monkeypatch, mode, base, factors, tokens, top_k):
    monkeypatch.setattr(op, "MXFP4_TOKENS", mode)
    hidden, inter = (64, 96) if base == "mxfp4" else (37, 21)
    ex = random_overlay(9, hidden, inter, (3, 5, 2), bias=True, activation="gpt_oss",
                        factor_dtype=FACTOR_DTYPES[factors], base=base)
    x = torch.randn(tokens, hidden) * 2
    ids, w = random_routing(tokens, 9, top_k)
    ids[0, -1] = ids[0, 0]                # a token choosing one expert twice
    calls = []
    monkeypatch.setattr(op, "_forward_small_cpu", lambda *a, _f=op._forward_small_cpu: calls.append(1) or _f(*a))
    out = overlay_moe_forward(x, ids, w, ex, backend="cpu")
    assert calls == [1]
    assert torch.equal(out, _staged(x, ids, w, ex))     # the same kernels, the same order: bit for bit
    # The integer modes' floors: 4x and 3x the worst error of 160 fresh draws (2.4e-4 and 2.2e-2 of the output
    # scale: the GPT-OSS activation amplifies the token rounding of both GEMVs).
    rel = {"int16": 2.0 ** -10, "int8": 2.0 ** -4}[mode] if (mode != "fp32" and base == "mxfp4") else 1e-6
    _assert_matches(out, x, ids, w, ex, rel_floor=rel)



@pytest.mark.parametrize("mode", ["int16", "fp32"])
@pytest.mark.parametrize("hidden,inter,ranks", [(64, 96, (3, 5, 2)), (32, 32, (64, 64, 64)), (64, 320, (40, 24, 33)),
                                                (96, 2048, (16, 16, 16))],
                         ids=["few-shrinks", "shrinks-outnumber-base", "many-base-rows", "expands-before-base"])
@pytest.mark.parametrize("tokens,top_k", [(1, 4), (2, 3), (5, 6)])
def test_pooled_stages_equal_the_staged_path(monkeypatch, mode, hidden, inter, ranks, tokens, top_k):
    # The one-call forward runs each stage's shrinks, base rows and row-streamed expands as one pool (each expand
    # waiting for its expert's shrinks, the base rows for the input rounding one thread does meanwhile) where the
    # shrinks fit in the first thread's run, and the stages one after another where they do not: 32 shrink items
    # against one base item at [32, 32] with rank 64 (the stage-by-stage order on two threads or more), a few
    # against 10 at [640, 64] (rank 64 for gate and up; the pool's base before its expands, which do not all fit in
    # the first run), and 64 base items at [4096, 96] with 2 shrink items per expert (the expands before the base,
    # as at T=1 on the benchmark's layer). Either way the bits of the staged path, whose stages run in separate
    # calls.
    monkeypatch.setattr(op, "MXFP4_TOKENS", mode)
    ex = random_overlay(6, hidden, inter, ranks, bias=True, activation="gpt_oss", factor_dtype=torch.bfloat16,
                        base="mxfp4")
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(tokens, hidden, generator=g) * 2
        ids, w = random_routing(tokens, 6, top_k)
        out = overlay_moe_forward(x, ids, w, ex, backend="cpu")
        assert torch.equal(out, _staged(x, ids, w, ex)), seed
        _assert_matches(out, x, ids, w, ex, rel_floor=2.0 ** -10 if mode == "int16" else 1e-6)

def test_inputs_on_another_device_are_refused():
    # The CPU fast path of the device check (is_cpu flags) must still refuse a tensor elsewhere, naming both.
    ex = random_overlay(4, 64, 32, (2, 2, 2), bias=True, activation="gpt_oss", factor_dtype=torch.bfloat16,
                        base="mxfp4")
    x = torch.randn(1, 64)
    ids, w = random_routing(1, 4, 2)
    for args in ((x.to("meta"), ids, w), (x, ids.to("meta"), w), (x, ids, w.to("meta"))):
        with pytest.raises(ValueError, match=r"different devices: \['cpu', 'meta'\]"):
            overlay_moe_forward(*args, ex, backend="cpu", check_ids=False)


def _warm_layer(**kw):
    """A layer whose caches (the extension's SmallLayer, the forward meta) are built, so that a call with
    check_ids=False may take the CPU fast path."""
    ex = random_overlay(4, 64, 32, (2, 3, 2), bias=True, activation="gpt_oss", factor_dtype=torch.bfloat16,
                        base="mxfp4", **kw)
    x = torch.randn(3, 64)
    ids, w = random_routing(3, 4, 2)
    overlay_moe_forward(x, ids, w, ex, backend="cpu", check_ids=False)
    assert all(key in ex.__dict__ for key in op._LAYER_CACHES)
    return ex, x, ids, w


def test_fast_path_equals_the_general_path(monkeypatch):
    # Ready inputs run _small_cpu_fast, with or without check_ids (the extension checks every id); with it
    # switched off, the same call runs the general path: the same result.
    ex, x, ids, w = _warm_layer()
    calls = []
    real = op._small_cpu_fast
    armed = [True]
    monkeypatch.setattr(op, "_small_cpu_fast", lambda *a: calls.append(real(*a) if armed[0] else None) or calls[-1])

    def general(*args):
        armed[0] = False
        try:
            return overlay_moe_forward(*args, ex, backend="cpu")
        finally:
            armed[0] = True

    for t in (1, 3, op.GEMV_MAX_ROWS, op.GEMV_MAX_ROWS + 1):
        xt = torch.randn(t, 64)
        it, wt = random_routing(t, 4, 2)
        for check_ids in (False, True):
            fast = overlay_moe_forward(xt, it, wt, ex, backend="cpu", check_ids=check_ids)
            assert (calls[-1] is not None) == (t <= op.GEMV_MAX_ROWS)  # above GEMV_MAX_ROWS: the staged path
            assert torch.equal(fast, general(xt, it, wt))
            assert calls[-1] is None  # the general call did not take it
        _assert_matches(fast, xt, it, wt, ex)
    for mode in ("int8", "fp32"):  # the token mode is read on every call
        monkeypatch.setattr(op, "MXFP4_TOKENS", mode)
        fast = overlay_moe_forward(x, ids, w, ex, backend="cpu")
        assert calls[-1] is not None
        assert torch.equal(fast, general(x, ids, w))


def test_fast_path_leaves_other_inputs_to_the_general_path():
    # Inputs the extension does not take as they are: converted by the general path, with the same result.
    ex, x, ids, w = _warm_layer()
    want = overlay_moe_forward(x, ids, w, ex, backend="cpu")
    wide = torch.randn(3, 128)
    for args in ((wide[:, ::2].copy_(x), ids, w),                       # x not contiguous
                 (x, ids.to(torch.int32), w),                             # int32 ids
                 (x, ids, w.double()),                                    # float64 weights
                 (x.T.contiguous().T, ids.T.contiguous().T, w)):         # transposed views
        assert torch.equal(overlay_moe_forward(*args, ex, backend="cpu", check_ids=False), want)
    half = overlay_moe_forward(x.bfloat16(), ids, w, ex, backend="cpu", check_ids=False)
    assert half.dtype == torch.bfloat16
    assert torch.equal(overlay_moe_forward(x[:0], ids[:0], w[:0], ex, backend="cpu", check_ids=False),
                       torch.zeros(0, 64))
    assert torch.equal(overlay_moe_forward(x, ids, w, ex, backend="torch", check_ids=False),
                       overlay_moe_forward(x, ids, w, ex, backend="torch"))


@pytest.mark.parametrize("case", ["hidden", "rank3", "rows", "ids_shape", "weights_shape", "ids_float",
                                  "device", "id_range"])
def test_fast_path_still_refuses_bad_inputs(case):
    # With the caches built (the fast path armed), every bad input still gets the general path's error.
    ex, x, ids, w = _warm_layer()
    args, err, match = {
        "hidden": ((torch.randn(3, 63), ids, w), ValueError, r"x must be \[T, 64\]"),
        "rank3": ((x[None], ids, w), ValueError, r"x must be \[T, 64\]"),
        "rows": ((x[:2], ids, w), ValueError, "topk_ids must be"),
        "ids_shape": ((x, ids[:, :1].contiguous(), w), ValueError, "must match topk_ids"),
        "weights_shape": ((x, ids, w[:, :1].contiguous()), ValueError, "must match topk_ids"),
        "ids_float": ((x, ids.float(), w), TypeError, "integer tensor"),
        "device": ((x, ids, w.to("meta")), ValueError, "different devices"),
        "id_range": ((x, torch.full_like(ids, 4), w), ValueError, "out of range"),
    }[case]
    with pytest.raises(err, match=match):
        overlay_moe_forward(*args, ex, backend="cpu", check_ids=False)
    if case == "id_range":  # checked, the armed fast path leaves it to the general path's message
        with pytest.raises(ValueError, match=r"topk_ids must be in \[0, 4\), got \[4, 4\]"):
            overlay_moe_forward(*args, ex, backend="cpu")


def test_fast_path_follows_replaced_tensors():
    # Assigning a field drops the caches: the next call takes the general path and rebuilds them.
    ex, x, ids, w = _warm_layer()
    first = overlay_moe_forward(x, ids, w, ex, backend="cpu", check_ids=False)
    ex.at_up = (ex.at_up.float() * 3).to(ex.at_up.dtype)
    assert op._small_cpu_fast(x, ids, w, ex, "cpu") is None
    out = overlay_moe_forward(x, ids, w, ex, backend="cpu", check_ids=False)
    assert not torch.equal(out, first)
    _assert_matches(out, x, ids, w, ex)
    assert torch.equal(op._small_cpu_fast(x, ids, w, ex, "cpu"), out)  # armed again


def test_one_call_weight_arguments_follow_replaced_tensors():
    # The extension's weight arguments are cached per OverlayExperts: replacing a tensor must not leave the
    # forward reading the old one.
    ex = random_overlay(6, 64, 32, (2, 3, 2), bias=True, activation="gpt_oss", factor_dtype=torch.bfloat16,
                        base="mxfp4")
    x = torch.randn(2, 64)
    ids, w = random_routing(2, 6, 2)
    first = overlay_moe_forward(x, ids, w, ex, backend="cpu")
    assert torch.equal(overlay_moe_forward(x, ids, w, ex, backend="cpu"), first)  # the cached arguments
    assert all(key in ex.__dict__ for key in op._LAYER_CACHES)
    ex.at_down = (ex.at_down.float() * 3).to(ex.at_down.dtype)
    assert not any(key in ex.__dict__ for key in op._LAYER_CACHES)  # assigning a field drops every cache
    ex.bias_up = torch.zeros_like(ex.bias_up)
    out = overlay_moe_forward(x, ids, w, ex, backend="cpu")
    assert not torch.equal(out, first)
    _assert_matches(out, x, ids, w, ex)


def test_a_layer_that_ran_still_pickles_and_copies():
    # The one-call forward caches a checked extension object on the OverlayExperts; pickle, deepcopy and
    # torch.save must not meet it, and the copy runs (building its own).
    import copy
    import io
    import pickle

    ex = random_overlay(4, 64, 32, (2, 2, 2), bias=True, activation="gpt_oss", factor_dtype=torch.bfloat16,
                        base="mxfp4")
    x = torch.randn(1, 64)
    ids, w = random_routing(1, 4, 2)
    y = overlay_moe_forward(x, ids, w, ex, backend="cpu")
    assert op._SMALL_LAYER in ex.__dict__
    buf = io.BytesIO()
    torch.save(ex, buf)
    for other in (copy.deepcopy(ex), pickle.loads(pickle.dumps(ex)), torch.load(io.BytesIO(buf.getvalue()),
                                                                                  weights_only=False)):
        assert not any(key in other.__dict__ for key in op._LAYER_CACHES)
        assert torch.equal(overlay_moe_forward(x, ids, w, other, backend="cpu"), y)
    assert op._SMALL_LAYER in ex.__dict__    # the original keeps its cache


def test_one_call_forward_without_biases_and_zero_ranks():
    for ranks, bias in (((0, 0, 0), False), ((2, 0, 1), False)):
        ex = random_overlay(4, 64, 32, ranks, bias=bias, activation="swiglu", factor_dtype=torch.bfloat16,
                            base="mxfp4")
        x = torch.randn(2, 64)
        ids, w = random_routing(2, 4, 2)
        out = overlay_moe_forward(x, ids, w, ex, backend="cpu")
        assert torch.equal(out, _staged(x, ids, w, ex))
        _assert_matches(out, x, ids, w, ex)


def test_one_call_binding_names_the_bad_argument():
    from lazarus_core.ops._backends import cpu_extension

    ex = random_overlay(4, 64, 32, (1, 1, 1), bias=False, activation="swiglu", factor_dtype=torch.bfloat16,
                        base="mxfp4")
    x = torch.randn(2, 64)
    ids, w = random_routing(2, 4, 2)
    with pytest.raises(ValueError, match="topk_ids holds an index out of range"):
        op._forward_small_cpu(x, ids + 4, w, ex)
    args = [x.numpy(), ids.numpy(), w.numpy(), ex.base_gate_up_blocks.numpy(), ex.base_gate_up_scales.numpy(),
            ex.base_down_blocks.numpy(), ex.base_down_scales.numpy(), 3, op._bits(ex.b_gate_up), op._bits(ex.b_down),
            op._bits(ex.at_gate), op._bits(ex.at_up), op._bits(ex.at_down), None, None, None, 1, 0, 1.0, 7.0, 1,
            torch.empty(2, 64).numpy()]
    bad = list(args)
    bad[2] = torch.randn(2, 3).numpy()
    with pytest.raises(ValueError, match="topk_weights"):
        cpu_extension().overlay_moe_small(*bad)
    bad = list(args)
    bad[-1] = torch.empty(2, 63).numpy()
    with pytest.raises(ValueError, match="y"):
        cpu_extension().overlay_moe_small(*bad)
    bad = list(args)
    bad[5] = ex.base_down_blocks[:-1].numpy()
    with pytest.raises(ValueError, match="blocks"):
        cpu_extension().overlay_moe_small(*bad)
    bad = list(args)
    bad[-2] = 7                           # no such token mode
    with pytest.raises(ValueError, match="tokens"):
        cpu_extension().overlay_moe_small(*bad)
    # The checked-once layer of the same weights: built from the weight arguments, checked as the binding checks
    # them; its forward takes data pointers and still checks every id, the token mode and null pointers.
    weights = args[3:17]
    bad = list(weights)
    bad[2] = ex.base_down_blocks[:-1].numpy()
    with pytest.raises(ValueError, match="blocks"):
        cpu_extension().SmallLayer(*bad)
    layer = cpu_extension().SmallLayer(*weights)
    assert (layer.hidden, layer.experts) == (64, 4)
    y = torch.empty(2, 64)
    ptrs = (x.data_ptr(), ids.data_ptr(), w.data_ptr(), 2, 2, 0, 1.0, 7.0)
    layer.forward(*ptrs, 1, y.data_ptr())
    expected = torch.empty(2, 64)
    cpu_extension().overlay_moe_small(*args[:-1], expected.numpy())
    assert torch.equal(y, expected)
    with pytest.raises(ValueError, match="tokens"):
        layer.forward(*ptrs, 7, y.data_ptr())
    with pytest.raises(ValueError, match="null"):
        layer.forward(*ptrs, 1, 0)
    far = ids + 4
    with pytest.raises(ValueError, match="topk_ids holds an index out of range"):
        layer.forward(x.data_ptr(), far.data_ptr(), w.data_ptr(), 2, 2, 0, 1.0, 7.0, 1, y.data_ptr())
