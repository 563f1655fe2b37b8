"""Experts as stored (MXFP4 blocks, FP8 codes, bf16/fp16/fp32), for fused decoding and for the
quantisation-noise estimate. Read them with :meth:`MoeCheckpoint.encoded_expert`; row ranges for analyses
that sweep all experts chunk by chunk with :meth:`MoeCheckpoint.expert_rows`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
        from lazarus_core.ops import dequant_axpby

        if self.format == "mxfp4":
            flat = dequant_axpby(self.data, y.view(self.shape[0], -1), scales=self.scales, alpha=alpha, beta=beta,
                                 out=None if out is None else out.view(self.shape[0], -1), backend=backend)
            return flat.view(self.shape)
        weight = self.decode() if self.format == "fp8_e4m3" else self.data
        return dequant_axpby(weight, y, alpha=alpha, beta=beta, out=out, backend=backend)

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The expert's weight ``[out, in]`` in ``dtype``."""
        from lazarus_core.ops import fp8_dequant, mxfp4_dequant

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
