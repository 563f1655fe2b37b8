"""Experts as stored (MXFP4 blocks, FP8 codes, bf16/fp16/fp32), for fused decoding and for the
quantisation-noise estimate, plus row-range reads for analyses that sweep all experts chunk by chunk."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lazarus_core.models.checkpoint import MoeCheckpoint
from lazarus_core.models.errors import CheckpointError
from lazarus_core.models.safetensors_file import DTYPES, FLOAT_DTYPES
from lazarus_core.ops import dequant_axpby, fp8_dequant, mxfp4_dequant

# Width of the rounding interval of each E2M1 magnitude code (in units of the block scale): codes
# 0..3 (0, .5, 1, 1.5) 0.5; 2 -> [1.75, 2.5); 3 -> [2.5, 3.5); 4 -> [3.5, 5); 6 -> [5, 6] (never clips).
_E2M1_INTERVAL = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.75, 1.0, 1.5, 1.0], dtype=torch.float64)


@dataclass
class EncodedExpert:
    """One expert's ``[out, in]`` weight in its stored encoding.

    Attributes
    ----------
    format : str
        ``"mxfp4"``, ``"fp8_e4m3"`` or ``"float"``.
    data : torch.Tensor
        mxfp4: uint8 blocks ``[out, in // 32, 16]``; fp8: uint8 codes ``[out, in]``; float: ``[out, in]``
        in the stored dtype.
    scales : torch.Tensor or None
        mxfp4: uint8 ``[out, in // 32]``; fp8: float ``weight_scale_inv`` blocks; float: None.
    block_size : tuple of int or None
        FP8 scale block (rows, cols).
    shape : tuple of int
        ``(out, in)``.
    """

    format: str
    data: torch.Tensor
    scales: torch.Tensor | None
    block_size: tuple[int, int] | None
    shape: tuple[int, int]

    def axpby(self, y: torch.Tensor, *, alpha: float = 1.0, beta: float = 1.0, out: torch.Tensor | None = None,
              backend: str = "auto") -> torch.Tensor:
        """``alpha * W + beta * y`` (fp32 ``[out, in]``), decoding and adding in one pass where a kernel exists."""
        if self.format == "mxfp4":
            flat = dequant_axpby(self.data, y.view(self.shape[0], -1), scales=self.scales, alpha=alpha, beta=beta,
                                 out=None if out is None else out.view(self.shape[0], -1), backend=backend)
            return flat.view(self.shape)
        weight = self.decode() if self.format == "fp8_e4m3" else self.data
        return dequant_axpby(weight, y, alpha=alpha, beta=beta, out=out, backend=backend)

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The expert's weight ``[out, in]`` in ``dtype``."""
        if self.format == "mxfp4":
            return mxfp4_dequant(self.data, self.scales).view(self.shape).to(dtype)
        if self.format == "fp8_e4m3":
            return fp8_dequant(self.data, self.scales, block_size=self.block_size).to(dtype)
        return self.data.to(dtype)

    def rounding_noise_energy(self) -> float | None:
        """Expected squared Frobenius norm of the rounding noise the encoding added (uniform-error model:
        each element's error is uniform over its rounding interval, variance width^2 / 12). None for floats."""
        if self.format == "mxfp4":
            scale = torch.pow(2.0, self.scales.to(torch.float64) - 127.0)  # [out, G]
            low = _E2M1_INTERVAL[(self.data & 7).long()]
            high = _E2M1_INTERVAL[((self.data >> 4) & 7).long()]
            width_sq = (low.square() + high.square()).sum(-1)  # [out, G]
            return float((width_sq * scale.square()).sum() / 12.0)
        if self.format == "fp8_e4m3":
            exponent = ((self.data >> 3) & 0xF).to(torch.float64).clamp_min(1.0)
            ulp = torch.pow(2.0, exponent - 10.0)  # E4M3: 3 mantissa bits, bias 7
            scale = self.scales.to(torch.float64)
            b0, b1 = self.block_size
            scale = scale.repeat_interleave(b0, 0)[: self.shape[0]].repeat_interleave(b1, 1)[:, : self.shape[1]]
            return float((ulp.square() * scale.square()).sum() / 12.0)
        return None


def read_encoded_expert(ckpt: MoeCheckpoint, layer: int, projection: str, expert: int) -> EncodedExpert:
    """Read one expert of one projection without decoding it.

    Parameters
    ----------
    ckpt : MoeCheckpoint
    layer, expert : int
    projection : {"gate", "up", "down"}

    Returns
    -------
    EncodedExpert
        ``[out, in]`` orientation. GPT-OSS bf16 (stored transposed and interleaved) comes back as a
        float32 copy in ``[out, in]`` (a transpose cannot be fused into a streaming pass).
    """
    ckpt._check_projection(projection)
    ckpt._check_layer(layer)
    ckpt._check_expert(expert, layer)
    shape = ckpt.projection_shape(projection)
    fmt = ckpt.storage_format(layer)
    if ckpt.spec.names.fused:
        if fmt != "mxfp4":
            return EncodedExpert("float", ckpt.expert_weight(layer, projection, expert), None, None, shape)
        stem = ckpt._prefix(layer) + ("experts.down_proj" if projection == "down" else "experts.gate_up_proj")
        bf, binfo = ckpt._locate(stem + "_blocks")
        sf, sinfo = ckpt._locate(stem + "_scales")
        if sinfo.shape != binfo.shape[:-1]:
            raise CheckpointError(f"{sf.path}: tensor {sinfo.name!r} {list(sinfo.shape)} does not match its MXFP4 "
                                  f"blocks {binfo.name!r} {list(binfo.shape)}")
        blocks, scales = bf.read_row(binfo.name, expert), sf.read_row(sinfo.name, expert)
        if projection != "down":
            start = 0 if projection == "gate" else 1
            blocks, scales = blocks[start::2].contiguous(), scales[start::2].contiguous()
        if tuple(blocks.shape) != (shape[0], shape[1] // 32, 16):
            raise CheckpointError(f"{bf.path}: tensor {binfo.name!r}: expert {expert} {projection} blocks have shape "
                                  f"{list(blocks.shape)}, expected {[shape[0], shape[1] // 32, 16]}")
        return EncodedExpert("mxfp4", blocks, scales, None, shape)
    name = ckpt._expert_name(layer, projection, expert)
    f, info = ckpt._locate(name)
    if fmt == "fp8_e4m3":
        block = tuple(ckpt.spec.fp8_block_size or (128, 128))
        ckpt._expect(f, info, shape, ("F8_E4M3",))
        sf, sinfo = ckpt._locate(name + "_scale_inv")
        ckpt._expect(sf, sinfo, (-(-shape[0] // block[0]), -(-shape[1] // block[1])), ("F32", "BF16", "F16"))
        return EncodedExpert("fp8_e4m3", f.read(name), sf.read(name + "_scale_inv").float(), block, shape)
    ckpt._expect(f, info, shape, FLOAT_DTYPES)
    return EncodedExpert("float", f.read(name), None, None, shape)


def read_expert_rows(ckpt: MoeCheckpoint, layer: int, projection: str, expert: int, start: int, stop: int
                     ) -> torch.Tensor:
    """Rows ``start:stop`` of one expert's ``[out, in]`` weight as float32, reading only those rows where
    the layout allows (per-expert tensors and fused MXFP4; FP8 reads whole scale-block rows).

    Returns
    -------
    torch.Tensor
        float32 ``[stop - start, in]``.
    """
    out_dim, in_dim = ckpt.projection_shape(projection)
    if not 0 <= start <= stop <= out_dim:
        raise IndexError(f"rows {start}:{stop} out of range for {projection} of shape {[out_dim, in_dim]}")
    fmt = ckpt.storage_format(layer)
    if ckpt.spec.names.fused and fmt == "mxfp4":
        stem = ckpt._prefix(layer) + ("experts.down_proj" if projection == "down" else "experts.gate_up_proj")
        bf, binfo = ckpt._locate(stem + "_blocks")
        sf, sinfo = ckpt._locate(stem + "_scales")
        n_groups = binfo.shape[2]
        # gate/up rows are interleaved on disk (even = gate, odd = up): read the stored row span, keep one parity.
        step, offset = (1, 0) if projection == "down" else (2, 0 if projection == "gate" else 1)
        r0, r1 = start * step, stop * step
        rows_per_expert = binfo.shape[1]
        blocks = bf._read_bytes(binfo.name, binfo.start + (expert * rows_per_expert + r0) * n_groups * 16,
                                (r1 - r0) * n_groups * 16).view(r1 - r0, n_groups, 16)[offset::step]
        scales = sf._read_bytes(sinfo.name, sinfo.start + (expert * rows_per_expert + r0) * n_groups,
                                (r1 - r0) * n_groups).view(r1 - r0, n_groups)[offset::step]
        return mxfp4_dequant(blocks, scales).view(stop - start, in_dim)
    if ckpt.spec.names.fused or fmt == "fp8_e4m3":
        if fmt == "fp8_e4m3":
            return read_encoded_expert(ckpt, layer, projection, expert).decode()[start:stop]
        return ckpt.expert_weight(layer, projection, expert)[start:stop]
    name = ckpt._expert_name(layer, projection, expert)
    f, info = ckpt._locate(name)
    ckpt._expect(f, info, (out_dim, in_dim), FLOAT_DTYPES)
    row_bytes = info.nbytes // out_dim
    raw = f._read_bytes(name, info.start + start * row_bytes, (stop - start) * row_bytes)
    return raw.view(DTYPES[info.dtype][0]).view(stop - start, in_dim).to(torch.float32)
