"""Overlay MoE forward: experts stored as ``W_e = base + A[e] @ B[e]``, run without rebuilding any ``W_e``.

The algebra (per token x routed to experts S with weights w_e):
- ``base_gate x`` and ``base_up x`` are shared by every selected expert: one dense GEMM over all tokens;
- each expert adds its low-rank correction ``A[e] (B[e] x)`` (+ bias), then the family's activation;
- the down projection is linear: ``sum_e w_e base_down h_e = base_down (sum_e w_e h_e)``, one dense GEMM on
  the weighted sum plus the k low-rank corrections ``w_e (A_down[e] (B_down[e] h_e) + bias_down[e])``.
The layer stays in its storage precision (bf16/fp16/fp32 factors, a float or MXFP4 base) and every kernel
computes in fp32. On the CPU the dense products (base products, grouped shrinks ``x @ B[e]^T``) of small batches
run a matrix-vector kernel that decodes the stored weight in registers, larger ones BLAS on fp32 tiles decoded
into a reused buffer (:func:`stored_matmul`); the fused kernel (cpu/cuda/triton) does the expand + bias +
activation + weighted reduction.
"""

from __future__ import annotations

import contextlib

import functools
from dataclasses import dataclass

import torch

from lazarus_core.ops._backends import cpu_extension, select_backend
from lazarus_core.ops.overlay_validate import validate_overlay_experts

ACTIVATIONS = {"swiglu": 0, "gpt_oss": 1}


@dataclass(kw_only=True)
class OverlayExperts:
    """One MoE layer's routed experts in overlay form, in STORAGE precision, in the layout the kernels read.

    Build with :meth:`from_factors`. ``I`` = expert intermediate size, ``H`` = hidden size, ``E`` experts.
    Every tensor is contiguous and on one device. The factors and biases share one float dtype (bf16, fp16 or
    fp32: the overlay's stored dtype); the base is either float (``base_gate_up``/``base_down`` in bf16, fp16
    or fp32, the ``*_blocks``/``*_scales`` None) or MXFP4 (``base_gate_up = base_down = None``, the packed
    blocks and scales set, as in gpt-oss and :func:`lazarus_core.ops.mxfp4_dequant`). Kernels compute in fp32.

    Attributes
    ----------
    base_gate_up : torch.Tensor or None
        Float base ``[2I, H]``: base gate rows above base up rows.
    base_down : torch.Tensor or None
        Float base ``[H, I]``.
    base_gate_up_blocks, base_gate_up_scales : torch.Tensor or None
        MXFP4 base: uint8 ``[2I, H/32, 16]`` and ``[2I, H/32]`` (gate rows above up rows).
    base_down_blocks, base_down_scales : torch.Tensor or None
        MXFP4 base: uint8 ``[H, I/32, 16]`` and ``[H, I/32]``.
    b_gate_up : torch.Tensor
        ``[E, rg + ru, H]``: ``B_gate[e]`` rows above ``B_up[e]`` rows (the shrink factors).
    at_gate, at_up : torch.Tensor
        ``[E, rg, I]``, ``[E, ru, I]``: expand factors transposed, ``A[e]^T``.
    b_down : torch.Tensor
        ``[E, rd, I]``.
    at_down : torch.Tensor
        ``[E, rd, H]``.
    bias_gate, bias_up : torch.Tensor or None
        ``[E, I]`` expert biases (GPT-OSS), else None; factor dtype.
    bias_down : torch.Tensor or None
        ``[E, H]``; factor dtype.
    activation : {"swiglu", "gpt_oss"}
        ``silu(g) * u``, or GPT-OSS's clamped ``g * sigmoid(alpha g) * (u + 1)``.
    alpha, limit : float
        GPT-OSS activation constants (``swiglu_alpha``, ``swiglu_limit``).
    """

    b_gate_up: torch.Tensor
    at_gate: torch.Tensor
    at_up: torch.Tensor
    b_down: torch.Tensor
    at_down: torch.Tensor
    base_gate_up: torch.Tensor | None = None
    base_down: torch.Tensor | None = None
    base_gate_up_blocks: torch.Tensor | None = None
    base_gate_up_scales: torch.Tensor | None = None
    base_down_blocks: torch.Tensor | None = None
    base_down_scales: torch.Tensor | None = None
    bias_gate: torch.Tensor | None = None
    bias_up: torch.Tensor | None = None
    bias_down: torch.Tensor | None = None
    activation: str = "swiglu"
    alpha: float = 1.702
    limit: float = 7.0

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"OverlayExperts: activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        validate_overlay_experts(self)  # shapes, dtypes, devices, contiguity: once, before any kernel sees it

    def __setattr__(self, name: str, value) -> None:
        # Assigning any field drops what the forward caches on the layer (the CPU forward's SmallLayer holds views
        # of the old tensors), so the forward checks its caches with one dict lookup each.
        for key in _LAYER_CACHES:
            self.__dict__.pop(key, None)
        object.__setattr__(self, name, value)

    def __getstate__(self) -> dict:
        """The fields for pickle / copy, without the CPU forward's cached extension object (which cannot be
        pickled and holds views of these very tensors; the next forward builds it again)."""
        state = dict(self.__dict__)
        for key in _LAYER_CACHES:
            state.pop(key, None)
        return state

    @property
    def base_format(self) -> str:
        """``"float"`` (``base_gate_up``/``base_down`` set) or ``"mxfp4"`` (blocks + scales set)."""
        return "float" if self.base_gate_up is not None else "mxfp4"

    @property
    def factor_dtype(self) -> torch.dtype:
        return self.b_gate_up.dtype

    @property
    def device(self) -> torch.device:
        return self.b_gate_up.device

    @property
    def num_experts(self) -> int:
        return self.at_gate.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.at_down.shape[2]

    @property
    def intermediate_size(self) -> int:
        return self.at_gate.shape[2]

    @property
    def ranks(self) -> dict[str, int]:
        return {"gate": self.at_gate.shape[1], "up": self.at_up.shape[1], "down": self.at_down.shape[1]}

    def nbytes(self) -> int:
        """Bytes held by every tensor of this layer as stored (bases, factors, biases; MXFP4 blocks + scales)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """Field name -> tensor, for every tensor that is set."""
        return {n: getattr(self, n) for n in _TENSOR_FIELDS if getattr(self, n) is not None}

    def base_fp32(self, which: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The base of ``which`` (``"gate_up"`` ``[2I, H]`` or ``"down"`` ``[H, I]``) decoded to ``dtype`` (a copy)."""
        if which not in ("gate_up", "down"):
            raise ValueError(f"base_fp32: which must be 'gate_up' or 'down', got {which!r}")
        dense = getattr(self, f"base_{which}")
        if dense is not None:
            return dense.to(dtype)
        from lazarus_core.ops.mxfp4_dequant import mxfp4_dequant

        blocks, scales = getattr(self, f"base_{which}_blocks"), getattr(self, f"base_{which}_scales")
        return mxfp4_dequant(blocks, scales).reshape(blocks.shape[0], -1).to(dtype)

    def factors(self, projection: str, dtype: torch.dtype | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(base [out, in], A [E, out, r], B [E, r, in])`` of one projection.

        The base is decoded to fp32 (or ``dtype``); ``A`` and ``B`` are views in the factor dtype, or copies in
        ``dtype`` when it is given.
        """
        i, rg = self.intermediate_size, self.at_gate.shape[1]
        base_dtype = dtype or torch.float32
        if projection == "gate":
            base, a, b = self.base_fp32("gate_up", base_dtype)[:i], self.at_gate.transpose(1, 2), self.b_gate_up[:, :rg]
        elif projection == "up":
            base, a, b = self.base_fp32("gate_up", base_dtype)[i:], self.at_up.transpose(1, 2), self.b_gate_up[:, rg:]
        elif projection == "down":
            base, a, b = self.base_fp32("down", base_dtype), self.at_down.transpose(1, 2), self.b_down
        else:
            raise ValueError(f"projection must be gate, up or down, got {projection!r}")
        if dtype is not None:
            a, b = a.to(dtype), b.to(dtype)
        return base, a, b

    def reconstruct(self, projection: str) -> torch.Tensor:
        """``[E, out, in]`` fp32 full expert weights ``base + A[e] @ B[e]`` (for tests and checks only)."""
        base, a, b = self.factors(projection, torch.float32)
        return base.unsqueeze(0) + torch.bmm(a, b)

    def to_float(self, dtype: torch.dtype = torch.float32) -> "OverlayExperts":
        """A copy with a float base and every factor and bias in ``dtype`` (``torch.float32``: the pre-storage-
        precision fp32 layout; ``torch.float64``: an oracle for tests)."""
        conv = {n: t.to(dtype) for n, t in self.tensors().items() if not n.endswith(("_blocks", "_scales"))}
        conv["base_gate_up"], conv["base_down"] = self.base_fp32("gate_up", dtype), self.base_fp32("down", dtype)
        return OverlayExperts(**conv, activation=self.activation, alpha=self.alpha, limit=self.limit)

    @classmethod
    def from_factors(cls, base: dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
                     a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                     bias: dict[str, torch.Tensor | None] | None = None, *, activation: str = "swiglu",
                     alpha: float = 1.702, limit: float = 7.0, device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None, base_dtype: torch.dtype | None = None) -> "OverlayExperts":
        """Build the kernel layout from the overlay checkpoint's per-projection tensors, keeping their dtypes.

        Parameters
        ----------
        base : dict
            projection -> the base in ``[out, in]`` orientation (gate/up ``[I, H]``, down ``[H, I]``): either a
            float tensor (bf16, fp16 or fp32), or for an MXFP4 base a tuple ``(blocks uint8 [out, in/32, 16],
            scales uint8 [out, in/32])`` (``in`` a multiple of 32). All three projections use one format.
        a : dict
            projection -> ``[E, out, r]``.
        b : dict
            projection -> ``[E, r, in]``.
        bias : dict, optional
            projection -> ``[E, out]`` or None.
        activation : {"swiglu", "gpt_oss"}
        alpha, limit : float
        device : optional
            Where the tensors go (default: where the gate base is).
        dtype : torch.dtype, optional
            Factor and bias dtype (default: ``a["gate"]``'s, i.e. as stored; no fp32 expansion).
        base_dtype : torch.dtype, optional
            Float base dtype (default: as stored). Given with an MXFP4 base, the base is decoded to it.

        Returns
        -------
        OverlayExperts

        Raises
        ------
        ValueError
            Missing projection, mixed base formats, inconsistent shapes (the message names the tensor), unknown
            activation.
        TypeError
            An MXFP4 base whose blocks or scales are not uint8.
        """
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        bias = bias or {}
        for p in ("gate", "up", "down"):
            for name, d in (("base", base), ("A", a), ("B", b)):
                if p not in d:
                    raise ValueError(f"overlay factors: {name} of projection {p!r} is missing")
        packed = {p: isinstance(base[p], (tuple, list)) for p in ("gate", "up", "down")}
        if len(set(packed.values())) != 1:
            raise ValueError(f"overlay factors: every base must be float or every base MXFP4, got {packed}")
        mxfp4 = packed["gate"]
        if mxfp4:
            for p in ("gate", "up", "down"):
                if len(base[p]) != 2 or any(t.dtype != torch.uint8 for t in base[p]):
                    raise TypeError(f"overlay factors: the MXFP4 base of {p!r} must be (blocks uint8, scales uint8)")
            inter, hidden = base["gate"][1].shape[0], base["gate"][1].shape[1] * 32
        else:
            inter, hidden = base["gate"].shape
        n_experts = a["gate"].shape[0]
        expected = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
        for p, (out_dim, in_dim) in expected.items():
            r = b[p].shape[1] if b[p].dim() == 3 else -1
            if mxfp4:
                checks = [(f"{p}.base_blocks", base[p][0], (out_dim, in_dim // 32, 16)),
                          (f"{p}.base_scales", base[p][1], (out_dim, in_dim // 32))]
                if in_dim % 32:
                    raise ValueError(f"overlay factors: an MXFP4 base needs in % 32 == 0; {p} has in = {in_dim}")
            else:
                checks = [(f"{p}.base", base[p], (out_dim, in_dim))]
            checks += [(f"{p}.A", a[p], (n_experts, out_dim, r)), (f"{p}.B", b[p], (n_experts, r, in_dim))]
            for name, t, shape in checks:
                if tuple(t.shape) != shape:
                    raise ValueError(f"overlay factors: {name} has shape {list(t.shape)}, expected {list(shape)}")
            if bias.get(p) is not None and tuple(bias[p].shape) != (n_experts, out_dim):
                raise ValueError(f"overlay factors: {p}.bias has shape {list(bias[p].shape)}, expected "
                                 f"{[n_experts, out_dim]}")
        gate_tensor = base["gate"][0] if mxfp4 else base["gate"]
        dev = torch.device(device) if device is not None else gate_tensor.device
        fdt = dtype or a["gate"].dtype

        def put(t: torch.Tensor | None, dt: torch.dtype | None = fdt) -> torch.Tensor | None:
            return None if t is None else t.to(device=dev, dtype=dt).contiguous()

        fields: dict[str, torch.Tensor | None] = {}
        if mxfp4 and base_dtype is None:
            fields["base_gate_up_blocks"] = put(torch.cat([base["gate"][0], base["up"][0]], 0), None)
            fields["base_gate_up_scales"] = put(torch.cat([base["gate"][1], base["up"][1]], 0), None)
            fields["base_down_blocks"], fields["base_down_scales"] = (put(t, None) for t in base["down"])
        else:
            if mxfp4:
                from lazarus_core.ops.mxfp4_dequant import mxfp4_dequant

                base = {p: mxfp4_dequant(*base[p]).reshape(base[p][1].shape[0], -1) for p in base}
            bdt = base_dtype or base["gate"].dtype
            fields["base_gate_up"] = put(torch.cat([base["gate"].to(bdt), base["up"].to(bdt)], 0), bdt)
            fields["base_down"] = put(base["down"], bdt)
        return cls(
            **fields, b_gate_up=put(torch.cat([b["gate"].to(fdt), b["up"].to(fdt)], 1)),
            at_gate=put(a["gate"].transpose(1, 2)), at_up=put(a["up"].transpose(1, 2)),
            b_down=put(b["down"]), at_down=put(a["down"].transpose(1, 2)),
            bias_gate=put(bias.get("gate")), bias_up=put(bias.get("up")), bias_down=put(bias.get("down")),
            activation=activation, alpha=float(alpha), limit=float(limit),
        )


_TENSOR_FIELDS = ("base_gate_up", "base_down", "base_gate_up_blocks", "base_gate_up_scales", "base_down_blocks",
                  "base_down_scales", "b_gate_up", "at_gate", "at_up", "b_down", "at_down", "bias_gate", "bias_up",
                  "bias_down")


def activation_reference(g: torch.Tensor, u: torch.Tensor, kind: str, alpha: float = 1.702, limit: float = 7.0
                         ) -> torch.Tensor:
    """The family activation on gate ``g`` and up ``u`` (same shapes): SwiGLU or GPT-OSS's clamped variant."""
    if kind == "gpt_oss":
        g = g.clamp(max=limit)
        u = u.clamp(-limit, limit)
        return g * torch.sigmoid(alpha * g) * (u + 1.0)
    return torch.nn.functional.silu(g) * u


def overlay_moe_forward_reference(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                                  experts: OverlayExperts) -> torch.Tensor:
    """Readable version: for every (token, expert) pair, the expert MLP through its factors, weighted and summed.

    ``y[t] = sum_k w[t,k] * ((base_d + A_d[e] B_d[e]) h + b_d[e])`` with
    ``h = act((base_g + A_g[e] B_g[e]) x + b_g[e], (base_u + A_u[e] B_u[e]) x + b_u[e])``, ``e = ids[t,k]``;
    each product applied factor by factor (never forming ``W_e``), the down projection per pair.

    Parameters
    ----------
    x : torch.Tensor
        ``[T, H]`` float.
    topk_ids : torch.Tensor
        ``[T, K]`` integer expert ids.
    topk_weights : torch.Tensor
        ``[T, K]`` float routing weights.
    experts : OverlayExperts

    Returns
    -------
    torch.Tensor
        ``[T, H]`` in ``x.dtype``.
    """
    t, k = topk_ids.shape
    ids = topk_ids.reshape(-1).long()
    # fp32 copies of the stored tensors; float64 for an oracle built with float64 factors (OverlayExperts.to_float)
    dtype = torch.float64 if experts.factor_dtype == torch.float64 else torch.float32
    xp = x.to(dtype).repeat_interleave(k, 0)  # [P, H], pair p = (token p // k, slot p % k)

    def project(inp: torch.Tensor, projection: str) -> torch.Tensor:
        base, a, b = experts.factors(projection, dtype)
        low = torch.bmm(a[ids], torch.bmm(b[ids], inp.unsqueeze(-1))).squeeze(-1)
        out = inp @ base.T + low
        bias = {"gate": experts.bias_gate, "up": experts.bias_up, "down": experts.bias_down}[projection]
        return out + bias[ids].to(dtype) if bias is not None else out

    h = activation_reference(project(xp, "gate"), project(xp, "up"), experts.activation, experts.alpha, experts.limit)
    y = project(h, "down") * topk_weights.reshape(-1, 1).to(dtype)
    return y.reshape(t, k, experts.hidden_size).sum(1).to(x.dtype)


@dataclass
class _Routing:
    """The (token, expert) pairs, and the map from each token's k slots to its pairs.

    Sorted routings order the pairs by expert (the BLAS shrink runs one GEMM per expert); unsorted ones keep
    slot order (pair = t*K + k), which the GPU kernels need no sort, bincount or host sync for.
    """

    pair_token: torch.Tensor   # [P] int64
    pair_expert: torch.Tensor  # [P] int64
    pair_weight: torch.Tensor  # [P] fp32
    offsets: torch.Tensor | None  # [E+1] int64 (sorted routings only)
    slot_pair: torch.Tensor    # [T*K] int64: slot t*K+k -> pair
    slot_expert: torch.Tensor  # [T*K] int64
    counts_t: torch.Tensor | None  # [E] int64 (sorted routings only)

    @functools.cached_property
    def counts(self) -> list[int]:
        """Pairs per expert on the host (sorted routings; a device sync on GPUs)."""
        return self.counts_t.tolist()


def _routing(topk_ids: torch.Tensor, topk_weights: torch.Tensor, n_experts: int, *, sort: bool = True) -> _Routing:
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1).long().contiguous()
    if not sort:
        slots = torch.arange(flat.numel(), device=flat.device)
        return _Routing(pair_token=slots // k, pair_expert=flat, pair_weight=topk_weights.reshape(-1).float().contiguous(),
                        offsets=None, slot_pair=slots, slot_expert=flat, counts_t=None)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    offsets = torch.zeros(n_experts + 1, dtype=torch.int64, device=flat.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    slot_pair = torch.empty_like(order)
    slot_pair[order] = torch.arange(order.numel(), device=flat.device)
    return _Routing(pair_token=(order // k).contiguous(), pair_expert=flat[order].contiguous(),
                    pair_weight=topk_weights.reshape(-1)[order].float().contiguous(), offsets=offsets,
                    slot_pair=slot_pair, slot_expert=flat, counts_t=counts)


# Storage format codes of the CPU extension (csrc/common/float_bits.h Storage).
_FORMATS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_MXFP4 = 3
# CPU crossovers (measured at the gpt-oss-20b shape, one thread): products of at most GEMV_MAX_ROWS input rows
# decode the weight in registers (MXFP4 base: 3.2 ms at 4 rows against 20 ms for tiles + BLAS; even at 16, the
# tiles win from 32); larger ones decode DECODE_TILE_ROWS weight rows at a time to fp32 and run BLAS (few large
# tiles: every tile is two parallel regions, which cost the most on a shared machine). Experts with at most
# SHRINK_MAX_PAIRS pairs shrink in the GEMV kernel (at 32 pairs per expert as fast as BLAS, in one parallel
# region for all experts), the others as one BLAS GEMM each on their factors converted to fp32.
GEMV_MAX_ROWS = 16
DECODE_TILE_ROWS = 2048
SHRINK_MAX_PAIRS = 64
# How the CPU matrix-vector kernel meets an MXFP4 weight (mxfp4_token_rounding is the readable version):
# - "int16" rounds each input row per 32-element block to 16-bit fixed point with a power-of-two scale (every
#   element off by at most 2^-14 of its block's largest |x|, far finer than the bf16 a model carries its hidden
#   states in), carried as two int8 terms; the products are summed exactly in integers (vpmaddubsw, vpmaddwd),
#   one fp32 FMA per pair of blocks applies both scales;
# - "int8" rounds to int8 with scale max|x| / 127 (off by at most max|x| / 254 per element, like llama.cpp's
#   Q8_0 activations): one integer product per weight instead of two, the fastest;
# - "fp32" converts every weight to fp32 and sums in fp32 (exact products), the slowest.
# A row holding inf or NaN, or a weight row with a NaN or zero scale byte, runs the fp32 kernel in every mode, so
# NaN propagates. Products of more than GEMV_MAX_ROWS rows keep the mode in an integer GEMM on the same rounded
# rows (csrc/overlay_moe/mxfp4_gemm_cpu.cpp, see _integer_gemm): int8 from AVX2 on, int16 with AVX-512 VNNI (at
# [256, 2880] x [5760, 2880] about 1.5x faster than BLAS on the fp32 weight in int16, 2.3x in int8; with AVX2
# alone 2.2x in int8). Otherwise, in "fp32", or with an input row holding inf or NaN, they decode fp32 tiles and
# run BLAS (exact products).
MXFP4_TOKENS = "int16"
_MXFP4_TOKEN_MODES = {"fp32": 0, "int16": 1, "int8": 2}  # the extension's kTokens* codes


def _bits(t: torch.Tensor):
    """numpy view of a contiguous CPU tensor for the extension (16-bit floats as their int16 bits)."""
    return t.view(torch.int16).numpy() if t.element_size() == 2 and t.is_floating_point() else t.numpy()


def _np(t: torch.Tensor | None):
    return None if t is None else _bits(t)


def _check_stored_weight(w: torch.Tensor | None, blocks: torch.Tensor | None, scales: torch.Tensor | None
                         ) -> tuple[int, int]:
    if (w is None) == (blocks is None) or (blocks is None) != (scales is None):
        raise ValueError("stored_matmul: pass either a float weight w, or MXFP4 blocks and scales")
    if w is not None:
        if w.dim() != 2 or w.dtype not in _FORMATS:
            raise TypeError(f"stored_matmul: w must be a 2-D fp32/bf16/fp16 tensor, got {w.dtype} {list(w.shape)}")
        return w.shape[0], w.shape[1]
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"stored_matmul: blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() != 3 or blocks.shape[2] != 16 or tuple(scales.shape) != tuple(blocks.shape[:2]):
        raise ValueError(f"stored_matmul: blocks must be [out, in/32, 16] and scales [out, in/32], got "
                         f"{list(blocks.shape)} and {list(scales.shape)}")
    return blocks.shape[0], blocks.shape[1] * 32


def _decode_rows(w: torch.Tensor | None, blocks: torch.Tensor | None, scales: torch.Tensor | None, r0: int, r1: int,
                 out: torch.Tensor) -> torch.Tensor:
    """Rows ``r0:r1`` of the stored weight decoded into ``out`` (fp32 ``[r1 - r0, in]``)."""
    if w is not None:
        return out.copy_(w[r0:r1])
    from lazarus_core.ops.mxfp4_dequant import mxfp4_dequant

    return mxfp4_dequant(blocks[r0:r1], scales[r0:r1], out=out)


def mxfp4_token_rounding(x: torch.Tensor, mode: str = "int16") -> torch.Tensor:
    """Readable version of how the CPU matrix-vector kernel rounds its input rows before an MXFP4 weight meets
    them (``mxfp4_tokens="int16"`` or ``"int8"``).

    Per row and 32-element block with largest ``|x|`` = ``m``:

    - ``"int16"``: ``k = 6 - e`` where ``m = f * 2^e`` with ``f`` in [0.5, 1) (``k = 0`` for an all-zero block,
      at most 140), ``N = round(x * 2^(k+8))`` (half to even, ``|N| <= 16384``) and the kernel computes with
      ``N * 2^-(k+8)``: every element is off by at most 2^-14 of ``m`` (by 2^-149 in the fp32 subnormals,
      ``m < 2^-135``).
    - ``"int8"``: ``d = m / 127`` in fp32, ``q = round(x / d)`` (0 when ``d`` is 0) clamped to +-127, and the
      kernel computes with ``q * d``: every element is off by at most ``m / 254``.

    Input holding inf or NaN anywhere is left as it is (the kernel then runs in fp32).

    Parameters
    ----------
    x : torch.Tensor
        ``[n, in]`` float, ``in % 32 == 0``.
    mode : {"int16", "int8"}
        The token mode.

    Returns
    -------
    torch.Tensor
        ``[n, in]`` float64: the values the integer kernel multiplies (exactly).
    """
    if mode not in ("int16", "int8"):
        raise ValueError(f"mxfp4_token_rounding: mode must be 'int16' or 'int8', got {mode!r}")
    xf = x.to(torch.float32)
    if not torch.isfinite(xf).all():
        return xf.double()
    blocks = xf.reshape(xf.shape[0], -1, 32)
    m = blocks.abs().amax(-1, keepdim=True)
    if mode == "int8":
        d = m / 127
        q = torch.where(d > 0, blocks / torch.where(d > 0, d, 1), 0).round().clamp(-127, 127)
        return (q.double() * d.double()).reshape(xf.shape)
    k = torch.where(m > 0, (6 - torch.frexp(m).exponent).clamp(max=140), torch.zeros_like(m, dtype=torch.int32))
    n = torch.ldexp(blocks.double(), (k + 8).double()).round()
    return torch.ldexp(n, -(k + 8).double()).reshape(xf.shape)


def stored_matmul_reference(x: torch.Tensor, w: torch.Tensor | None = None, *, blocks: torch.Tensor | None = None,
                            scales: torch.Tensor | None = None) -> torch.Tensor:
    """Readable :func:`stored_matmul`: decode the whole weight to fp32, then ``x @ W^T``."""
    if w is None:
        from lazarus_core.ops.mxfp4_dequant import mxfp4_dequant_reference

        w = mxfp4_dequant_reference(blocks, scales).reshape(blocks.shape[0], -1)
    return x.float() @ w.float().T


def stored_matmul(x: torch.Tensor, w: torch.Tensor | None = None, *, blocks: torch.Tensor | None = None,
                  scales: torch.Tensor | None = None, backend: str = "auto", mxfp4_tokens: str | None = None
                  ) -> torch.Tensor:
    """``x @ W^T`` for a weight kept in its stored precision, computed in fp32 without materialising ``W`` in fp32.

    On the CPU, at most :data:`GEMV_MAX_ROWS` rows of ``x`` run a matrix-vector kernel that decodes ``W`` in
    registers (bf16/fp16 converted, MXFP4 decoded inside the product). More rows against an MXFP4 ``W`` run an
    integer GEMM (rows rounded as ``mxfp4_tokens`` says, as in the matrix-vector kernel) in ``"int8"`` where the
    CPU has AVX2 and in ``"int16"`` where it has AVX-512 VNNI; otherwise (and for bf16/fp16,
    ``mxfp4_tokens="fp32"`` or rows holding inf or NaN) they decode :data:`DECODE_TILE_ROWS` rows of ``W`` at a
    time into one reused fp32 buffer and run BLAS on it. An fp32 ``W`` with many rows goes straight to BLAS.

    Parameters
    ----------
    x : torch.Tensor
        ``[n, in]`` float (computed in fp32).
    w : torch.Tensor, optional
        ``[out, in]`` fp32, bf16 or fp16.
    blocks, scales : torch.Tensor, optional
        Instead of ``w``: an MXFP4 weight, uint8 ``[out, in/32, 16]`` and ``[out, in/32]``.
    backend : {"auto", "cpu", "torch"}
        ``"torch"`` decodes the whole weight and multiplies (the reference); other devices than the CPU run it.
    mxfp4_tokens : {"int16", "int8", "fp32"}, optional
        How the CPU kernels meet an MXFP4 ``W`` (default :data:`MXFP4_TOKENS`, see there).

    Returns
    -------
    torch.Tensor
        ``[n, out]`` fp32.

    Raises
    ------
    TypeError, ValueError
        Both or neither weight form, wrong dtypes or shapes (the message names the argument).
    """
    out_dim, in_dim = _check_stored_weight(w, blocks, scales)
    if x.dim() != 2 or x.shape[1] != in_dim:
        raise ValueError(f"stored_matmul: x must be [n, {in_dim}], got {list(x.shape)}")
    tokens = _mxfp4_tokens(mxfp4_tokens)
    impl = select_backend("stored_matmul", backend, x.device, {"cpu": _stored_matmul_cpu,
                                                              "torch": stored_matmul_reference})
    if impl is stored_matmul_reference:
        return impl(x, w, blocks=blocks, scales=scales)
    return impl(x, w, blocks=blocks, scales=scales, tokens=tokens)


@contextlib.contextmanager
def mxfp4_token_mode(mode: str | None):
    """Run the block with :data:`MXFP4_TOKENS` set to ``mode`` (restored after; None leaves it as it is).

    Parameters
    ----------
    mode : {"int16", "int8", "fp32"} or None
        How the CPU matrix-vector kernel meets an MXFP4 weight (see :data:`MXFP4_TOKENS`).

    Raises
    ------
    ValueError
        An unknown mode (the message lists the modes).
    """
    global MXFP4_TOKENS
    if mode is not None:
        _mxfp4_tokens(mode)
    saved = MXFP4_TOKENS
    MXFP4_TOKENS = saved if mode is None else mode
    try:
        yield
    finally:
        MXFP4_TOKENS = saved


@contextlib.contextmanager
def _cpu_switch(setter: str, allowed: bool):
    """Set one of the extension's form switches (``set_avx_vnni``, ``set_avx512_vnni``, ``set_avx512_vbmi``) for
    the block."""
    set_form = getattr(cpu_extension(), setter)
    saved = set_form(bool(allowed))
    try:
        yield
    finally:
        set_form(saved)


@contextlib.contextmanager
def cpu_avx_vnni(allowed: bool):
    """Run the block with the ymm VNNI forms of the CPU kernels allowed or forbidden (restored after).

    The integer MXFP4 kernel has a ymm ``vpdpbusd`` form that runs where the CPU has AVX-VNNI (VEX encoding) or
    AVX-512 VNNI + VL (EVEX encoding, e.g. AMD Zen 4, Intel Ice Lake); forbidden, its AVX2 form runs. The zmm form
    is switched by :func:`cpu_avx512_vnni` alone: forbid both for the AVX2 form on an AVX-512 CPU. All forms
    compute the same integers and fp32 operations, so results are bit-identical; this exists to compare their
    speed and to test them on one machine. Not for use while another thread runs a kernel.

    Parameters
    ----------
    allowed : bool
        False runs the AVX2 forms where no zmm form may; True (the default state) the ymm VNNI forms where the
        CPU has them.
    """
    with _cpu_switch("set_avx_vnni", allowed):
        yield


@contextlib.contextmanager
def cpu_avx512_vnni(allowed: bool):
    """Run the block with the AVX-512 VNNI forms of the CPU kernels allowed or forbidden (restored after).

    Products of an MXFP4 weight with more than :data:`GEMV_MAX_ROWS` rows run the integer GEMM in its AVX-512
    VNNI form where the CPU has it (the token rounding of :data:`MXFP4_TOKENS`); forbidden, as on CPUs without it,
    int8 runs its AVX2 form (the same bits) and int16 decodes fp32 tiles (exact products). Smaller products run
    the matrix-vector kernel's zmm form (bit-identical to its ymm forms, which run when forbidden). This exists to
    compare the paths and to test them on one machine. Not for use while another thread runs a kernel.

    Parameters
    ----------
    allowed : bool
        False runs the other paths; True (the default state) the AVX-512 VNNI forms where the CPU has them.
    """
    with _cpu_switch("set_avx512_vnni", allowed):
        yield


@contextlib.contextmanager
def cpu_avx512_vbmi(allowed: bool):
    """Run the block with the AVX-512 VBMI forms of the zmm CPU kernels allowed or forbidden (restored after).

    Where the CPU has AVX-512 VBMI (Ice Lake, AMD Zen 4 on; not Cascade Lake), the integer MXFP4 matrix-vector
    kernel's zmm form decodes the 4-bit codes with one ``vpermb`` per half instead of a mask and a ``vpshufb``;
    forbidden, its AVX-512 VNNI form runs. The same bytes, so the same bits; this exists to compare their speed and
    to test both on one machine. :func:`cpu_avx512_vnni` (False) forbids both. Not for use while another thread
    runs a kernel.

    Parameters
    ----------
    allowed : bool
        False runs the AVX-512 VNNI forms; True (the default state) the VBMI forms where the CPU has them.
    """
    with _cpu_switch("set_avx512_vbmi", allowed):
        yield


def _mxfp4_tokens(mode: str | None) -> int:
    """The extension's code for an MXFP4 token mode (None: :data:`MXFP4_TOKENS`)."""
    mode = MXFP4_TOKENS if mode is None else mode
    if mode not in _MXFP4_TOKEN_MODES:
        raise ValueError(f"mxfp4_tokens must be one of {tuple(_MXFP4_TOKEN_MODES)}, got {mode!r}")
    return _MXFP4_TOKEN_MODES[mode]


def _integer_gemm(tokens: int) -> bool:
    """Whether an MXFP4 product of more than GEMV_MAX_ROWS rows runs the integer GEMM in this token mode: int8
    wherever the extension has a form (AVX2 on), int16 only in the AVX-512 VNNI form. With AVX2 alone the int16
    GEMM (two u8 x s8 products per weight) ran at fp32 BLAS's speed (AMD Zen 3: 62.9 against 53.0 GMAC/s at
    [256, 2880] x [5760, 2880], and the T=256 overlay forward at 0.87x and 0.96x the fp32 twin in two benchmark
    runs, where decoded tiles had given 1.01-1.18x in four), so there the exact tiles keep it."""
    if tokens == _MXFP4_TOKEN_MODES["int8"]:
        return True
    return tokens == _MXFP4_TOKEN_MODES["int16"] and cpu_extension().cpu_uses_avx512_vnni()


def _stored_matmul_cpu(x: torch.Tensor, w: torch.Tensor | None = None, *, blocks: torch.Tensor | None = None,
                       scales: torch.Tensor | None = None, tokens: int | None = None) -> torch.Tensor:
    out_dim, in_dim = (w.shape if w is not None else (blocks.shape[0], blocks.shape[1] * 32))
    xf = x.to(torch.float32).contiguous()
    n = xf.shape[0]
    if w is not None and w.dtype == torch.float32:
        return xf @ w.T
    y = torch.empty(n, out_dim, dtype=torch.float32)
    if n == 0 or out_dim == 0:
        return y
    tokens = _mxfp4_tokens(None) if tokens is None else tokens
    if n <= GEMV_MAX_ROWS:
        data, sc, fmt = (_bits(w), None, _FORMATS[w.dtype]) if w is not None else (blocks.numpy(), scales.numpy(), _MXFP4)
        cpu_extension().stored_matvec(data, sc, fmt, out_dim, in_dim, xf.numpy(), None, y.numpy(), tokens)
        return y
    if (blocks is not None and _integer_gemm(tokens)
            and cpu_extension().mxfp4_gemm(blocks.numpy(), scales.numpy(), out_dim, in_dim, xf.numpy(), y.numpy(),
                                           tokens)):
        return y
    tiles = -(-out_dim // DECODE_TILE_ROWS)
    tile = torch.empty(-(-out_dim // tiles), in_dim, dtype=torch.float32)  # equal tiles of at most DECODE_TILE_ROWS
    part = torch.empty(n, tile.shape[0], dtype=torch.float32)
    for r0 in range(0, out_dim, tile.shape[0]):
        r1 = min(out_dim, r0 + tile.shape[0])
        decoded = _decode_rows(w, blocks, scales, r0, r1, tile[:r1 - r0])
        torch.mm(xf, decoded.T, out=part[:, :r1 - r0])
        y[:, r0:r1] = part[:, :r1 - r0]
    return y


def _base_weight(ex: OverlayExperts, which: str) -> dict[str, torch.Tensor | None]:
    if ex.base_format == "float":
        return {"w": getattr(ex, f"base_{which}")}
    return {"blocks": getattr(ex, f"base_{which}_blocks"), "scales": getattr(ex, f"base_{which}_scales")}


def _base_cpu(inp: torch.Tensor, ex: OverlayExperts, which: str) -> torch.Tensor:
    """``inp @ base^T`` of ``which`` ("gate_up" or "down") in its stored precision."""
    w = _base_weight(ex, which)
    return _stored_matmul_cpu(inp, w.pop("w", None), **w)


def _base_torch(inp: torch.Tensor, ex: OverlayExperts, which: str) -> torch.Tensor:
    return inp @ ex.base_fp32(which).T


def _shrink_blas(inp: torch.Tensor, rows: torch.Tensor | None, factors: torch.Tensor, routing: _Routing,
                 skip_pairs: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out[p] = factors[e(p)] @ inp[rows[p]]`` for expert-sorted pairs: one BLAS GEMM per expert that has pairs
    (more than ``skip_pairs`` pairs when given), on the expert's factors converted to fp32 into one reused buffer
    (it stays in cache: the stored factors are read once, at their own width)."""
    if out is None:
        out = torch.empty(routing.pair_expert.numel(), factors.shape[1], dtype=torch.float32, device=inp.device)
    buf = None if factors.dtype == torch.float32 else torch.empty(factors.shape[1:], device=inp.device)
    start = 0
    for e, n in enumerate(routing.counts):
        if n and (skip_pairs is None or n > skip_pairs):
            src = inp[rows[start:start + n]] if rows is not None else inp[start:start + n]
            torch.mm(src, (factors[e] if buf is None else buf.copy_(factors[e])).T, out=out[start:start + n])
        start += n
    return out


def _shrink_cpu(inp: torch.Tensor, rows: torch.Tensor | None, factors: torch.Tensor, routing: _Routing) -> torch.Tensor:
    """As :func:`_shrink_blas`; experts with at most SHRINK_MAX_PAIRS pairs run the stored-precision GEMV kernel."""
    n_experts, rank, cols = factors.shape
    out = torch.empty(routing.pair_expert.numel(), rank, dtype=torch.float32)
    if rank == 0 or out.shape[0] == 0:
        return out
    cpu_extension().overlay_shrink(_bits(factors), _FORMATS[factors.dtype], n_experts, rank, cols,
                                   routing.offsets.numpy(), SHRINK_MAX_PAIRS, inp.numpy(), _np(rows), out.numpy())
    if max(routing.counts) > SHRINK_MAX_PAIRS:
        _shrink_blas(inp, rows, factors, routing, skip_pairs=SHRINK_MAX_PAIRS, out=out)
    return out


def _base_shrink_torch(inp: torch.Tensor, ex: OverlayExperts, which: str, shrink_inp: torch.Tensor,
                       rows: torch.Tensor | None, factors: torch.Tensor, routing: _Routing
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inp @ base^T, grouped shrink of shrink_inp[rows] by factors)``: the two products of one stage."""
    return _base_torch(inp, ex, which), _shrink_blas(shrink_inp, rows, factors, routing)


def _base_shrink_cpu(inp: torch.Tensor, ex: OverlayExperts, which: str, shrink_inp: torch.Tensor,
                     rows: torch.Tensor | None, factors: torch.Tensor, routing: _Routing
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`_base_shrink_torch` in storage precision. When the base runs its matrix-vector kernel (a stored
    base, at most GEMV_MAX_ROWS rows) both products run in ONE parallel region of the extension (at T=1 the
    forward is then 4 regions instead of 6: each one waits for every thread, a descheduled one included)."""
    w = _base_weight(ex, which)
    n_experts, rank, cols = factors.shape
    dense = w.get("w")
    if inp.shape[0] > GEMV_MAX_ROWS or (dense is not None and dense.dtype == torch.float32) or rank == 0:
        return _base_cpu(inp, ex, which), _shrink_cpu(shrink_inp, rows, factors, routing)
    if dense is not None:
        data, sc, fmt, out_dim = _bits(dense), None, _FORMATS[dense.dtype], dense.shape[0]
    else:
        data, sc, fmt, out_dim = w["blocks"].numpy(), w["scales"].numpy(), _MXFP4, w["blocks"].shape[0]
    y = torch.empty(inp.shape[0], out_dim, dtype=torch.float32)
    s = torch.empty(routing.pair_expert.numel(), rank, dtype=torch.float32)
    cpu_extension().stored_matvec_and_shrink(data, sc, fmt, out_dim, inp.shape[1], inp.numpy(), None, y.numpy(),
                                             _bits(factors), _FORMATS[factors.dtype], n_experts, rank, cols,
                                             routing.offsets.numpy(), SHRINK_MAX_PAIRS, shrink_inp.numpy(),
                                             _np(rows), s.numpy(), _mxfp4_tokens(None))
    if max(routing.counts) > SHRINK_MAX_PAIRS:
        _shrink_blas(shrink_inp, rows, factors, routing, skip_pairs=SHRINK_MAX_PAIRS, out=s)
    return y, s


def _gate_up_torch(gu0, s_gu, r: _Routing, ex: OverlayExperts, h, hw):
    i, rg = ex.intermediate_size, ex.at_gate.shape[1]
    start = 0
    for e, n in enumerate(r.counts):
        if not n:
            continue
        rows = slice(start, start + n)
        tok = r.pair_token[rows]
        g = gu0[tok, :i] + s_gu[rows, :rg] @ ex.at_gate[e].float()
        u = gu0[tok, i:] + s_gu[rows, rg:] @ ex.at_up[e].float()
        if ex.bias_gate is not None:
            g = g + ex.bias_gate[e].float()
        if ex.bias_up is not None:
            u = u + ex.bias_up[e].float()
        h[rows] = activation_reference(g, u, ex.activation, ex.alpha, ex.limit)
        start += n
    hw.zero_().index_add_(0, r.pair_token, h * r.pair_weight[:, None])


def _down_torch(s_d, r: _Routing, ex: OverlayExperts, y):
    corr = torch.empty(s_d.shape[0], ex.hidden_size, dtype=torch.float32, device=y.device)
    start = 0
    for e, n in enumerate(r.counts):
        if n:
            rows = slice(start, start + n)
            corr[rows] = s_d[rows] @ ex.at_down[e].float()
            if ex.bias_down is not None:
                corr[rows] += ex.bias_down[e].float()
            start += n
    y.index_add_(0, r.pair_token, corr * r.pair_weight[:, None])


def _check_portable(ex: OverlayExperts) -> None:
    if ex.factor_dtype != torch.float32:
        raise TypeError("the portable overlay kernels (the host twin of the CUDA arithmetic) read fp32 factors, got "
                        f"{ex.factor_dtype}")


def _gate_up_cpu(gu0, s_gu, r: _Routing, ex: OverlayExperts, h, hw, portable: bool = False):
    ext = cpu_extension()
    args = (gu0.numpy(), s_gu.numpy(), r.pair_token.numpy(), r.pair_weight.numpy(), r.offsets.numpy(),
            _bits(ex.at_gate), _bits(ex.at_up), _np(ex.bias_gate), _np(ex.bias_up), ACTIVATIONS[ex.activation],
            ex.alpha, ex.limit, h.numpy(), hw.numpy())
    if portable:
        _check_portable(ex)
        ext.overlay_gate_up_portable(*args, r.slot_pair.numpy(), r.slot_expert.numpy(), r.slot_pair.numel() // hw.shape[0])
    else:
        ext.overlay_gate_up(*args, _FORMATS[ex.factor_dtype])


def _down_cpu(s_d, r: _Routing, ex: OverlayExperts, y, portable: bool = False):
    ext = cpu_extension()
    args = (s_d.numpy(), r.pair_token.numpy(), r.pair_weight.numpy(), r.offsets.numpy(), _bits(ex.at_down),
            _np(ex.bias_down), y.numpy())
    if portable:
        _check_portable(ex)
        ext.overlay_down_portable(*args, r.slot_pair.numpy(), r.slot_expert.numpy(), r.slot_pair.numel() // y.shape[0])
    else:
        ext.overlay_down(*args, _FORMATS[ex.factor_dtype])


_SMALL_LAYER = "_cpu_small_layer"  # instance attribute: the extension's checked SmallLayer
_LAYER_META = "_forward_meta"      # instance attribute: _layer_meta's tuple
_LAYER_CACHES = (_SMALL_LAYER, _LAYER_META)
_CPU = torch.device("cpu")


def _small_layer(ex: OverlayExperts):
    """The layer's weights as the extension's ``SmallLayer`` (checked once, holding numpy views of its tensors),
    built once per OverlayExperts and dropped by ``OverlayExperts.__setattr__`` when a field is assigned (a
    replaced tensor): at T=1 converting and checking 15 tensors per call is a few percent of the forward."""
    layer = ex.__dict__.get(_SMALL_LAYER)
    if layer is None:
        layer = ex.__dict__[_SMALL_LAYER] = cpu_extension().SmallLayer(*_small_weight_args(ex))
    return layer


def _small_weight_args(ex: OverlayExperts) -> tuple:
    """The layer's weight arguments of ``overlay_moe_small`` / ``SmallLayer`` (numpy views of its tensors)."""
    if ex.base_format == "float":
        base = (_bits(ex.base_gate_up), None, _bits(ex.base_down), None, _FORMATS[ex.base_gate_up.dtype])
    else:
        base = (ex.base_gate_up_blocks.numpy(), ex.base_gate_up_scales.numpy(), ex.base_down_blocks.numpy(),
                ex.base_down_scales.numpy(), _MXFP4)
    return (*base, _bits(ex.b_gate_up), _bits(ex.b_down), _bits(ex.at_gate), _bits(ex.at_up), _bits(ex.at_down),
            _np(ex.bias_gate), _np(ex.bias_up), _np(ex.bias_down), _FORMATS[ex.factor_dtype])


def _forward_small_cpu(xf: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                       ex: OverlayExperts) -> torch.Tensor:
    """The whole forward of at most GEMV_MAX_ROWS tokens in ONE call and one parallel region of the extension
    (the pairs sorted there too): at T=1 the stages of the staged path cost more in calls and thread wake-ups
    than in bytes. The inputs go as data pointers, checked by :func:`_check_inputs` and made contiguous in
    their dtype here (numpy views would cost 15-20 us each with the interpreter's state just evicted)."""
    ids, w = _contiguous_as(topk_ids, torch.int64), _contiguous_as(topk_weights, torch.float32)
    t, k = ids.shape
    y = torch.empty_like(xf)
    _, _, _, activation, alpha, limit = _layer_meta(ex)
    _small_layer(ex).forward(xf.data_ptr(), ids.data_ptr(), w.data_ptr(), t, k, activation, alpha, limit,
                             _mxfp4_tokens(None), y.data_ptr())
    return y


def _contiguous_as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` itself when already contiguous in ``dtype`` (two attribute reads instead of two dispatched ops,
    which at T=1 with the weights just read from DRAM cost about 10-30 us each), else a contiguous copy."""
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()


# backend -> (base product + grouped shrink, fused gate/up stage, fused down stage); GPU backends live in
# lazarus_core.ops.overlay_moe_gpu
_CPU_STAGES = (_base_shrink_cpu, _gate_up_cpu, _down_cpu)  # at most GEMV_MAX_ROWS tokens: _forward_small_cpu
_IMPLS = {
    "cpu": _CPU_STAGES,
    "cuda": "cuda",      # -> lazarus_core.ops.overlay_moe_gpu.overlay_moe_forward_gpu
    "triton": "triton",
    "torch": (_base_shrink_torch, _gate_up_torch, _down_torch),
}


def _layer_meta(ex: OverlayExperts) -> tuple:
    """(hidden size, number of experts, on the CPU, activation code, alpha, limit) of the layer, computed once and
    dropped by ``OverlayExperts.__setattr__`` with the other caches."""
    meta = ex.__dict__.get(_LAYER_META)
    if meta is None:
        meta = ex.__dict__[_LAYER_META] = (ex.hidden_size, ex.num_experts, ex.device.type == "cpu",
                                           ACTIVATIONS[ex.activation], ex.alpha, ex.limit)
    return meta


def _small_cpu_fast(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, ex: OverlayExperts,
                    backend: str) -> torch.Tensor | None:
    """The one-call CPU forward when every input is already as the extension takes it (fp32 ``x`` and weights,
    int64 ids, all contiguous 2-D on the CPU, at most GEMV_MAX_ROWS tokens, the layer's caches built, the compiled
    CPU backend chosen), else None: the general path then checks, converts and raises as usual. The decode call
    of the model integration lands here; it reads each tensor attribute once and makes no other Python call (at
    T=1, with the interpreter's state just evicted by the weights, the general path's checks, conversions and
    helper calls cost 30-40 us more). The extension checks every id before it computes, so ``check_ids`` does not
    need the general path's device-to-host range check here (on the benchmark layer with its weights flushed, that
    path took 1.485 ms a call against 1.320 ms for this one, medians of 280 interleaved rounds); a bad id returns
    None, and the general path raises its error naming the range."""
    d = getattr(ex, "__dict__", None)
    meta = d.get(_LAYER_META) if d is not None and type(ex) is OverlayExperts else None
    layer = d.get(_SMALL_LAYER) if meta is not None else None
    tokens = _MXFP4_TOKEN_MODES.get(MXFP4_TOKENS)
    if layer is None or not meta[2] or tokens is None or _CPU_SELECTED.get(backend) is not _CPU_STAGES:
        return None
    xs, ids_shape, ws = x.shape, topk_ids.shape, topk_weights.shape
    if (len(xs) != 2 or xs[1] != meta[0] or not 0 < xs[0] <= GEMV_MAX_ROWS or len(ids_shape) != 2
            or ids_shape[0] != xs[0] or ids_shape[1] < 1 or ws != ids_shape):
        return None
    if not (x.dtype is torch.float32 and topk_ids.dtype is torch.int64 and topk_weights.dtype is torch.float32
            and x.is_cpu and topk_ids.is_cpu and topk_weights.is_cpu and x.is_contiguous()
            and topk_ids.is_contiguous() and topk_weights.is_contiguous()):
        return None
    y = torch.empty_like(x)
    try:
        layer.forward(x.data_ptr(), topk_ids.data_ptr(), topk_weights.data_ptr(), xs[0], ids_shape[1], meta[3],
                      meta[4], meta[5], tokens, y.data_ptr())
    except ValueError:  # an id outside [0, E), found before any compute: the general path's check names the range
        return None
    return y


def _check_inputs(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, ex: OverlayExperts,
                  check_ids: bool = True) -> torch.device:
    # Each tensor attribute is read once: at T=1, with the interpreter's state just evicted by the weights, every
    # read through torch's bindings costs microseconds.
    if not isinstance(ex, OverlayExperts):
        raise TypeError(f"overlay_moe_forward: experts must be an OverlayExperts, got {type(ex).__name__}")
    hidden, num_experts, layer_on_cpu = _layer_meta(ex)[:3]
    xs, ids_shape, ws = x.shape, topk_ids.shape, topk_weights.shape
    if len(xs) != 2 or xs[1] != hidden:
        raise ValueError(f"overlay_moe_forward: x must be [T, {hidden}], got {list(xs)}")
    if len(ids_shape) != 2 or ids_shape[0] != xs[0] or ids_shape[1] < 1:
        raise ValueError(f"overlay_moe_forward: topk_ids must be [T={xs[0]}, K>=1], got {list(ids_shape)}")
    ids_dtype = topk_ids.dtype
    if ids_dtype.is_floating_point or ids_dtype == torch.bool:
        raise TypeError(f"overlay_moe_forward: topk_ids must be an integer tensor, got {ids_dtype}")
    if ws != ids_shape:
        raise ValueError(f"overlay_moe_forward: topk_weights {list(ws)} must match topk_ids {list(ids_shape)}")
    if check_ids and topk_ids.numel():
        lo, hi = (int(v) for v in torch.stack(torch.aminmax(topk_ids)).tolist())   # one device sync
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"overlay_moe_forward: topk_ids must be in [0, {num_experts}), got [{lo}, {hi}]")
    if layer_on_cpu and x.is_cpu and topk_ids.is_cpu and topk_weights.is_cpu:  # no torch.device objects made
        return _CPU
    device = x.device
    devices = {device, topk_ids.device, topk_weights.device, ex.device}
    if len(devices) != 1:
        raise ValueError(f"overlay_moe_forward: tensors are on different devices: {sorted(map(str, devices))}")
    return device


_CPU_SELECTED: dict = {}  # backend name -> the implementation select_backend gave for CPU tensors


def _cpu_impl(backend: str):
    """``select_backend`` for CPU tensors, remembered per backend name after its first success (at T=1 the
    selection's Python, run with the interpreter's state just evicted by the weights, cost about 14 us a call)."""
    impl = _CPU_SELECTED.get(backend)
    if impl is None:
        impl = _CPU_SELECTED[backend] = select_backend("overlay_moe_forward", backend, _CPU, _IMPLS)
    return impl


def overlay_moe_forward(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, experts: OverlayExperts,
                        *, backend: str = "auto", check_ids: bool = True) -> torch.Tensor:
    """Routed-experts output of one MoE layer in overlay form (the experts module's forward).

    Parameters
    ----------
    x : torch.Tensor
        ``[T, H]`` hidden states (any float dtype; computed in fp32).
    topk_ids : torch.Tensor
        ``[T, K]`` integer expert ids in ``[0, E)``.
    topk_weights : torch.Tensor
        ``[T, K]`` routing weights as the model mixes them (the family's convention already applied).
    experts : OverlayExperts
        The layer's overlay in its storage precision, on ``x``'s device.
    backend : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"``. ``"cpu"`` reads every weight as stored
        (see :func:`stored_matmul` for the base products and the shrink); ``"torch"`` is the readable path on
        fp32 copies.
    check_ids : bool
        Check that every id is in ``[0, E)`` (one device-to-host copy, a sync on GPUs). Callers whose ids come
        from a top-k over the layer's own E router scores (the model integration) may skip it so the host
        can launch ahead of the GPU. The CPU extension checks every id in any case.

    Returns
    -------
    torch.Tensor
        ``[T, H]`` in ``x.dtype``.

    Raises
    ------
    TypeError, ValueError
        Bad shapes, dtypes, expert ids or devices (the message names the argument).
    BackendUnavailableError
        An explicitly requested backend cannot run here.
    """
    if torch.is_grad_enabled() and (x.requires_grad or topk_weights.requires_grad):
        # A differentiable call: the custom op, whose backward runs through the factors (its forward lands here
        # again below autograd, where the inputs no longer require grad).
        from lazarus_core.ops.overlay_moe_op import overlay_moe_op

        return overlay_moe_op(x, topk_ids, topk_weights, experts, backend=backend, check_ids=check_ids)
    y = _small_cpu_fast(x, topk_ids, topk_weights, experts, backend)  # the extension checks every id itself
    if y is not None:
        return y
    device = _check_inputs(x, topk_ids, topk_weights, experts, check_ids)
    impl = _cpu_impl(backend) if device.type == "cpu" else select_backend("overlay_moe_forward", backend, device,
                                                                          _IMPLS)
    if isinstance(impl, str):
        from lazarus_core.ops.overlay_moe_gpu import overlay_moe_forward_gpu
        return overlay_moe_forward_gpu(x, topk_ids, topk_weights, experts, impl)
    base_shrink, gate_up, down = impl
    t, dtype = x.shape[0], x.dtype
    if t == 0:
        return torch.zeros_like(x)
    xf = x if dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()
    if impl is _CPU_STAGES and t <= GEMV_MAX_ROWS:
        y = _forward_small_cpu(xf, topk_ids, topk_weights, experts)
        return y if dtype == torch.float32 else y.to(dtype)
    i = experts.intermediate_size
    r = _routing(topk_ids, topk_weights, experts.num_experts)
    # [T, 2I] base once per token, [P, rg+ru] grouped shrink
    gu0, s_gu = base_shrink(xf, experts, "gate_up", xf, r.pair_token, experts.b_gate_up, r)
    h = torch.empty(r.pair_token.numel(), i, dtype=torch.float32, device=x.device)
    hw = torch.empty(t, i, dtype=torch.float32, device=x.device)
    gate_up(gu0, s_gu, r, experts, h, hw)                                # fused expand + bias + act + weighted sum
    y, s_d = base_shrink(hw, experts, "down", h, None, experts.b_down, r)  # [T, H] on the weighted sum, [P, rd]
    down(s_d, r, experts, y)                                             # fused expand + bias + weighted sum
    return y.to(x.dtype)


def overlay_moe_flops(tokens: int, top_k: int, experts: OverlayExperts) -> int:
    """Multiply-add flops (2 per MAC) of :func:`overlay_moe_forward` for ``tokens`` tokens."""
    h, i = experts.hidden_size, experts.intermediate_size
    r = experts.ranks
    pairs = tokens * top_k
    dense = tokens * (2 * i * h + h * i)
    low = pairs * ((r["gate"] + r["up"]) * (h + i) + r["down"] * (i + h))
    return 2 * (dense + low)


def overlay_moe_bytes(tokens: int, top_k: int, experts: OverlayExperts) -> int:
    """Weight bytes one forward must read at least, as stored: the bases plus the factors and biases of the
    experts it touches (``min(E, tokens * top_k)`` distinct experts)."""
    used = min(experts.num_experts, tokens * top_k)
    per_expert = [t for n, t in experts.tensors().items() if not n.startswith("base_")]
    base = sum(t.numel() * t.element_size() for n, t in experts.tensors().items() if n.startswith("base_"))
    return base + used * sum(t[0].numel() * t.element_size() for t in per_expert)
