"""GPU implementations (cuda, triton) of the overlay MoE forward; :func:`overlay_moe_forward` dispatches here.

The CPU ("cpu") and reference ("torch") paths stay in :mod:`lazarus_core.ops.overlay_moe`. Both GPU backends
run the same pipeline on the overlay in its storage precision (docs/gpu.md):

1. the (token, expert) pairs sorted by expert and cut into tiles of ``BLOCK_M`` pairs of one expert, all on
   the device (stable argsort, a scatter-add histogram, cumsum, searchsorted: no host sync, graph-capturable);
2. ``gu0 = x @ base_gate_up^T`` (dense; cuBLAS through torch for a float base, in bf16 when both ``x`` and the
   base are bf16; for an MXFP4 base the Triton GEMM that decodes tiles in registers, or on the cuda backend a
   decode to bf16/fp32 then cuBLAS);
3. grouped shrink ``s = B_gu[e] x`` per tile (split-K when there are few tiles), expand + biases + activation
   per tile into ``h [T*K, I]`` (slot order), ``hw = sum_k w h`` (one batched GEMV);
4. grouped shrink of ``h`` by ``B_down``, ``y = hw @ base_down^T`` (dense), and the down expand per tile with
   the routing weight in its epilogue into ``corr [T*K, H]``; ``y += sum_k corr``.

Every low-rank product reads its factors once per tile (not once per pair) and accumulates in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lazarus_core.ops._backends import cuda_extension, triton_module
from lazarus_core.ops.overlay_moe import ACTIVATIONS, OverlayExperts

BLOCK_M = 16   # pairs per tile (the kernels take it from the TileMap; the CUDA kernels allow at most 16)
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}   # Storage in csrc/common/float_bits.h


@dataclass
class TileMap:
    """The expert-sorted pairs and their tiles (all device tensors; sizes known on the host without a sync).

    Attributes
    ----------
    slot : torch.Tensor
        int64 ``[P]``: slot ``t * K + k`` of sorted pair ``q`` (pairs sorted by expert, stable).
    token : torch.Tensor
        int64 ``[P]``: ``slot // K``.
    offsets : torch.Tensor
        int64 ``[E + 1]``: sorted pairs ``offsets[e] .. offsets[e+1]-1`` use expert ``e``.
    tile_expert : torch.Tensor
        int32 ``[n_tiles]``: expert of each tile, -1 for the unused tail (``n_tiles = P // BLOCK_M + min(E, P)``
        bounds the tiles of any routing).
    tile_row : torch.Tensor
        int64 ``[n_tiles]``: first sorted pair of each tile; a tile ends at ``block_m`` pairs or its expert's end.
    block_m : int
        Pairs per tile.
    """

    slot: torch.Tensor
    token: torch.Tensor
    offsets: torch.Tensor
    tile_expert: torch.Tensor
    tile_row: torch.Tensor
    block_m: int

    @property
    def tiles(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """``(tile_expert, tile_row, offsets, block_m)``, as the kernels take them."""
        return self.tile_expert, self.tile_row, self.offsets, self.block_m


def tile_map(topk_ids: torch.Tensor, n_experts: int, block_m: int = BLOCK_M) -> TileMap:
    """Group the pairs of ``topk_ids [T, K]`` by expert into tiles of at most ``block_m`` pairs of one expert.

    Parameters
    ----------
    topk_ids : torch.Tensor
        ``[T, K]`` integer expert ids in ``[0, E)``.
    n_experts : int
        ``E``.
    block_m : int
        Pairs per tile: at most 16 for the CUDA kernels, a power of two of at least 16 for ``tl.dot``.

    Returns
    -------
    TileMap
        Device tensors only; built without a host sync (argsort, a scatter-add histogram, cumsum, searchsorted).
    """
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1).long()
    pairs, dev = flat.numel(), flat.device
    slot = torch.argsort(flat, stable=True)
    counts = torch.zeros(n_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    offsets = torch.zeros(n_experts + 1, dtype=torch.int64, device=dev)
    torch.cumsum(counts, 0, out=offsets[1:])
    tiles_per_expert = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles_per_expert, 0)
    n_tiles = pairs // block_m + min(n_experts, pairs)
    tid = torch.arange(n_tiles, device=dev)
    expert = torch.searchsorted(tile_end, tid, right=True)           # E for tiles past the last one
    e = expert.clamp(max=n_experts - 1)
    tile_row = offsets[e] + (tid - (tile_end[e] - tiles_per_expert[e])) * block_m
    tile_expert = torch.where(expert < n_experts, expert, -1).to(torch.int32)
    return TileMap(slot=slot, token=slot // k, offsets=offsets, tile_expert=tile_expert, tile_row=tile_row,
                   block_m=block_m)


def _dense_matmul(inp: torch.Tensor, weight: torch.Tensor, low_precision: bool) -> torch.Tensor:
    """fp32 ``inp @ weight^T``: with ``inp`` rounded to the weight's half dtype and fp32 accumulation when
    ``low_precision`` (cuBLAS through ``torch.mm(..., out_dtype=float32)``; off CUDA the same arithmetic in fp32:
    products of half values are exact in fp32), else in fp32."""
    if low_precision and weight.dtype in (torch.bfloat16, torch.float16):
        rounded = inp.to(weight.dtype)
        if weight.is_cuda:
            return torch.mm(rounded, weight.T, out_dtype=torch.float32)
        return rounded.float() @ weight.float().T
    return inp.float() @ weight.to(torch.float32).T


def _base_matmul(inp: torch.Tensor, which: str, ex: OverlayExperts, x_dtype: torch.dtype, backend: str
                 ) -> torch.Tensor:
    """fp32 ``inp @ base_<which>^T`` (``which`` = ``"gate_up"`` or ``"down"``) in the base's storage format.

    The product runs in bf16/fp16 (fp32 accumulation) when ``x`` itself has that dtype, i.e. when the model
    runs in it; otherwise in fp32."""
    dense = getattr(ex, f"base_{which}")
    if dense is not None:
        return _dense_matmul(inp, dense, x_dtype == dense.dtype)
    blocks, scales = getattr(ex, f"base_{which}_blocks"), getattr(ex, f"base_{which}_scales")
    bf16 = x_dtype == torch.bfloat16
    if backend == "triton":
        return triton_module(inp.device).mxfp4_matmul_triton(inp.contiguous(), blocks, scales, bf16_dot=bf16)
    from lazarus_core.ops.mxfp4_dequant import mxfp4_dequant

    decoded = mxfp4_dequant(blocks, scales, dtype=torch.bfloat16 if bf16 else torch.float32,
                            backend="cuda" if inp.is_cuda else "auto")
    return _dense_matmul(inp, decoded.reshape(blocks.shape[0], -1), bf16)


class _Triton:
    def __init__(self, device: torch.device):
        self.mod = triton_module(device)

    def shrink(self, inp, rows, m: TileMap, b, pairs):
        return self.mod.grouped_shrink_triton(inp, rows, m.tiles, b, pairs)

    def gate_up(self, gu0, s_gu, m: TileMap, ex, top_k, h):
        self.mod.gate_up_expand_triton(gu0, s_gu, m.slot, m.tiles, ex, top_k, h)

    def down(self, s_d, m: TileMap, slot_weight, ex, corr):
        self.mod.down_expand_triton(s_d, m.slot, slot_weight, m.tiles, ex, corr)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


class _Cuda:
    """The CUDA launchers; ``host=True`` runs their host twin (the same kernel bodies on CPU tensors, for tests)."""

    def __init__(self, device: torch.device, host: bool = False):
        self.ext = cuda_extension() if not host else _import_cuda_module()
        self.device, self.host = device, host

    def _call(self, name: str, *args) -> None:
        if self.host:
            getattr(self.ext, name + "_host")(*args, 0)
            return
        with torch.cuda.device(self.device):
            getattr(self.ext, name)(*args, torch.cuda.current_stream(self.device).cuda_stream)

    @staticmethod
    def _tiles(m: TileMap):
        return (m.tile_expert.data_ptr(), m.tile_row.data_ptr(), m.offsets.data_ptr(), m.tile_expert.numel(),
                m.block_m)

    def _target_blocks(self) -> int:
        """Blocks the split-K shrink aims for: two per SM (the host twin: a fixed 128)."""
        if self.host:
            return 128
        return 2 * torch.cuda.get_device_properties(self.device).multi_processor_count

    def shrink(self, inp, rows, m: TileMap, b, pairs):
        rank, in_dim = b.shape[1], b.shape[2]
        split, k_chunk = self.ext.overlay_shrink_split(m.tile_expert.numel(), rank, in_dim, self._target_blocks())
        out = torch.empty(split, pairs, rank, dtype=torch.float32, device=inp.device)
        self._call("overlay_grouped_shrink", inp.data_ptr(), rows.data_ptr(), *self._tiles(m), b.data_ptr(),
                   _DTYPE_CODES[b.dtype], out.data_ptr(), pairs, in_dim, rank, split, k_chunk)
        return out[0] if split == 1 else out.sum(0)

    def gate_up(self, gu0, s_gu, m: TileMap, ex, top_k, h):
        self._call("overlay_gate_up_expand", gu0.data_ptr(), s_gu.data_ptr(), m.slot.data_ptr(), *self._tiles(m),
                   ex.at_gate.data_ptr(), ex.at_up.data_ptr(), _ptr(ex.bias_gate), _ptr(ex.bias_up),
                   _DTYPE_CODES[ex.factor_dtype], ACTIVATIONS[ex.activation], ex.alpha, ex.limit, h.data_ptr(),
                   m.slot.numel(), h.shape[1], ex.at_gate.shape[1], ex.at_up.shape[1], top_k)

    def down(self, s_d, m: TileMap, slot_weight, ex, corr):
        self._call("overlay_down_expand", s_d.data_ptr(), m.slot.data_ptr(), slot_weight.data_ptr(), *self._tiles(m),
                   ex.at_down.data_ptr(), _ptr(ex.bias_down), _DTYPE_CODES[ex.factor_dtype], corr.data_ptr(),
                   m.slot.numel(), corr.shape[1], ex.at_down.shape[1])


def _import_cuda_module():
    """``lazarus_core._C_cuda`` without requiring a device (its host twin runs anywhere it was built)."""
    from lazarus_core.ops._backends import _import_extension
    from lazarus_core.errors import BackendUnavailableError

    mod = _import_extension("_C_cuda")
    if isinstance(mod, str):
        raise BackendUnavailableError(mod)
    return mod


_BACKENDS = {"cuda": _Cuda, "triton": _Triton}


def overlay_moe_forward_gpu(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                            experts: OverlayExperts, backend: str) -> torch.Tensor:
    """Overlay MoE forward on the cuda or triton kernels, in the overlay's storage precision.

    The caller (:func:`lazarus_core.ops.overlay_moe_forward`) has checked shapes, ids and devices.

    Parameters
    ----------
    x : torch.Tensor
        ``[T, H]`` hidden states (any float dtype; the low-rank part runs in fp32, the dense base products in
        bf16/fp16 with fp32 accumulation when ``x`` has the base's half dtype, else in fp32).
    topk_ids, topk_weights : torch.Tensor
        ``[T, K]`` expert ids in ``[0, E)`` and routing weights.
    experts : OverlayExperts
        On ``x``'s device; factors bf16, fp16 or fp32; base float or MXFP4.
    backend : {"cuda", "triton"}

    Returns
    -------
    torch.Tensor
        ``[T, H]`` in ``x.dtype``.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"overlay_moe_forward_gpu: backend must be 'cuda' or 'triton', got {backend!r}")
    if experts.factor_dtype not in _DTYPE_CODES:
        raise TypeError(f"overlay_moe_forward_gpu: factors must be fp32, bf16 or fp16, got {experts.factor_dtype}")
    t, k = topk_ids.shape
    if t == 0:
        return torch.zeros_like(x)
    kern = _BACKENDS[backend](x.device)
    hidden, inter, pairs = experts.hidden_size, experts.intermediate_size, t * k
    m = tile_map(topk_ids, experts.num_experts)
    xf = x.to(torch.float32).contiguous()
    slot_weight = topk_weights.reshape(-1).to(torch.float32).contiguous()
    gu0 = _base_matmul(x, "gate_up", experts, x.dtype, backend)          # [T, 2I] dense, once per token
    s_gu = kern.shrink(xf, m.token, m, experts.b_gate_up, pairs)         # [P, rg+ru] grouped shrink
    h = torch.empty(pairs, inter, dtype=torch.float32, device=x.device)
    kern.gate_up(gu0, s_gu, m, experts, k, h)                            # [T*K, I] expand + biases + activation
    hw = torch.bmm(slot_weight.view(t, 1, k), h.view(t, k, inter)).view(t, inter)
    s_d = kern.shrink(h, m.slot, m, experts.b_down, pairs)               # [P, rd]
    y = _base_matmul(hw, "down", experts, x.dtype, backend)              # [T, H] dense on the weighted sum
    corr = torch.empty(pairs, hidden, dtype=torch.float32, device=x.device)
    kern.down(s_d, m, slot_weight, experts, corr)                        # [T*K, H] w * (expand + bias)
    y += corr.view(t, k, hidden).sum(1)
    return y.to(x.dtype)
