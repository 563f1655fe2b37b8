"""Streaming access to the experts of any supported MoE checkpoint, one decoded expert at a time.

Every projection comes out in ``[out, in]`` orientation (``gate``/``up``: ``[I, H]``, ``down``: ``[H, I]``),
GPT-OSS gate/up de-interleaved (even columns of ``gate_up_proj [E, H, 2I]`` are gate, odd are up) and
transposed, DBRX cut from its fused ``[E*I, H]`` tensors (rows ``e*I:(e+1)*I``; ``w2`` holds down
transposed); MXFP4 decoded with ``ops.mxfp4_dequant``, FP8 E4M3 blocks with ``ops.fp8_dequant``,
bf16/fp16 upcast. Shapes and dtypes are checked against the family from the file headers before
any data is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from lazarus_core.models._memory import ResidentBudget
from lazarus_core.models.errors import CheckpointError
from lazarus_core.models.families import FamilySpec, detect_family
from lazarus_core.models.resolve import CONFIG_NAME, INDEX_NAME, SINGLE_NAME, ModelSource, resolve_model
from lazarus_core.models.safetensors_file import FLOAT_DTYPES, SafetensorsFile, TensorInfo

if TYPE_CHECKING:
    from lazarus_core.models.encoded import EncodedExpert

PROJECTIONS = ("gate", "up", "down")


@dataclass
class RouterWeights:
    """One MoE layer's router.

    Attributes
    ----------
    weight : torch.Tensor
        ``[E, H]``: logits = hidden @ weight.T (+ bias).
    bias : torch.Tensor or None
        ``[E]`` logit bias (GPT-OSS), else None.
    selection_bias : torch.Tensor or None
        ``[E]`` DeepSeek-V3 ``e_score_correction_bias`` (added to scores for expert choice only), else None.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    selection_bias: torch.Tensor | None


class MoeCheckpoint:
    """A resolved MoE checkpoint. Create with :func:`open_moe_checkpoint`.

    Attributes
    ----------
    source : ModelSource
        Where the files come from (local directory, built-in alias, or hub id with revision).
    config : dict
        The parsed ``config.json``.
    spec : FamilySpec
        Family facts: sizes, ``num_experts``, ``top_k``, ``moe_layers``, ``routing`` convention,
        ``shared_experts``, ``expert_bias``, quantisation.
    """

    def __init__(self, source: ModelSource):
        self.source = source
        self.config = source.read_json(CONFIG_NAME)
        self.spec: FamilySpec = detect_family(self.config)
        self._weight_map = source.weight_map()
        self._index_name = INDEX_NAME if self._weight_map else SINGLE_NAME
        self._files: dict[str, SafetensorsFile] = {}
        if not self._weight_map:  # single model.safetensors: its header is the map
            single = self._file(SINGLE_NAME)
            self._weight_map = {name: SINGLE_NAME for name in single.tensors}
        # Memory guard of the per-call readers (encoded_expert, expert_rows): one budget per (layer, projection).
        self._guard_key: tuple[int, str] | None = None
        self._guard: ResidentBudget | None = None

    # ---- config facts -------------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def num_experts(self) -> int:
        return self.spec.num_experts

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return self.spec.moe_layers

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description: source, family facts and per-projection shapes."""
        return {
            "model": self.source.name,
            "source": self.source.kind,
            "revision": self.source.revision,
            **self.spec.to_dict(),
            "projection_shapes": {p: list(self.projection_shape(p)) for p in PROJECTIONS},
            "storage": self.storage_format(self.spec.moe_layers[0]),
        }

    def projection_shape(self, projection: str, layer: int | None = None) -> tuple[int, int]:
        """``(out, in)`` of one routed expert's ``projection`` (the same for every MoE layer).

        Parameters
        ----------
        projection : {"gate", "up", "down"}
        layer : int, optional
            Checked to be an MoE layer when given.
        """
        self._check_projection(projection)
        if layer is not None:
            self._check_layer(layer)
        h, i = self.spec.hidden_size, self.spec.expert_intermediate_size
        return (h, i) if projection == "down" else (i, h)

    def storage_format(self, layer: int) -> str:
        """How layer ``layer``'s routed experts are stored: ``"bf16"``/``"fp16"``/``"fp32"``, ``"fp8_e4m3"``
        or ``"mxfp4"`` (from the file headers)."""
        self._check_layer(layer)
        if self.spec.names.layout == "dbrx":
            info = self._info(self._dbrx_name(layer, "down"))
            return _FORMAT_NAMES.get(info.dtype, info.dtype.lower())
        if self.spec.names.fused:
            base = self._prefix(layer) + "experts.down_proj"
            if base + "_blocks" in self._weight_map:
                return "mxfp4"
            return _FORMAT_NAMES.get(self._info(base).dtype, self._info(base).dtype.lower())
        info = self._info(self._expert_name(layer, "down", 0))
        return "fp8_e4m3" if info.dtype == "F8_E4M3" else _FORMAT_NAMES.get(info.dtype, info.dtype.lower())

    # ---- routed experts -----------------------------------------------------------------------------
    def expert_weight(self, layer: int, projection: str, expert: int, *, dtype: torch.dtype = torch.float32,
                      out: torch.Tensor | None = None) -> torch.Tensor:
        """One routed expert's weight, decoded.

        Parameters
        ----------
        layer : int
            Model layer index (must be in ``moe_layers``).
        projection : {"gate", "up", "down"}
        expert : int
            ``0 <= expert < num_experts``.
        dtype : torch.dtype, optional
            Output dtype (default float32); ignored when ``out`` is given (its dtype is used).
        out : torch.Tensor, optional
            Contiguous CPU ``[out, in]`` tensor to decode into (no new allocation for the result).

        Returns
        -------
        torch.Tensor
            ``[out, in]`` contiguous: ``[I, H]`` for gate/up, ``[H, I]`` for down; ``out`` itself when given,
            else freshly allocated.

        Raises
        ------
        IndexError
            Layer not an MoE layer, or expert out of range (the message names the checkpoint).
        CheckpointError
            Missing shard/tensor, wrong shape or dtype, MXFP4 scales not matching blocks; names file and tensor.
        """
        return self._expert_weight(layer, projection, expert, dtype, out, None)

    def _expert_weight(self, layer, projection, expert, dtype, out, scratch) -> torch.Tensor:
        self._check_projection(projection)
        self._check_layer(layer)
        self._check_expert(expert, layer)
        shape = self.projection_shape(projection)
        if out is not None:
            if tuple(out.shape) != shape or not out.is_contiguous() or out.device.type != "cpu":
                raise ValueError(f"out must be a contiguous CPU tensor of shape {list(shape)}, got "
                                 f"{list(out.shape)} on {out.device}")
            dtype = out.dtype
        if self.spec.names.fused:
            return self._fused_expert(layer, projection, expert, dtype, out, scratch)
        return self._read_linear(self._expert_name(layer, projection, expert), shape, dtype, out, scratch,
                                 self._what(layer, projection, expert))

    def iter_experts(self, layer: int, projection: str, *, dtype: torch.dtype = torch.float32, reuse: bool = False
                     ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(expert, weight [out, in])`` for every expert of one layer and projection, in order.

        Parameters
        ----------
        layer, projection, dtype
            As :meth:`expert_weight`.
        reuse : bool, optional
            False (default): each yielded tensor is freshly allocated and stays valid. True: every expert is
            decoded into the SAME output tensor (and raw bytes into one scratch buffer), so the yielded tensor
            is overwritten by the next iteration; use it for one-pass consumers (spectra, running sums). Faster
            (no page faults on fresh memory) and resident memory stays at one expert.

        Notes
        -----
        Only one expert's decoded weight is alive inside the iterator at a time, and when resident memory
        has grown by more than about three decoded experts since the stream began, freed heap pages are
        returned to the OS; so peak memory is the caller's own references plus a few experts.
        """
        self._check_projection(projection)
        self._check_layer(layer)
        out = torch.empty(self.projection_shape(projection), dtype=dtype) if reuse else None
        scratch = torch.empty(0, dtype=torch.uint8) if reuse else None
        rows, cols = self.projection_shape(projection)
        budget = ResidentBudget(3 * rows * cols * max(torch.empty(0, dtype=dtype).element_size(), 4))
        for expert in range(self.spec.num_experts):
            if expert > 0:
                budget.enforce()  # past ~3 decoded experts above where we started, give freed pages back
            if reuse:
                scratch = self._grown_scratch(scratch, layer, projection)
            yield expert, self._expert_weight(layer, projection, expert, dtype, out, scratch)

    def _grown_scratch(self, scratch: torch.Tensor, layer: int, projection: str) -> torch.Tensor:
        """A uint8 buffer large enough for one expert's raw bytes of this projection."""
        if self.spec.names.layout == "dbrx":
            need = self._info(self._dbrx_name(layer, projection)).nbytes // self.spec.num_experts
        elif self.spec.names.fused:
            stem = self._prefix(layer) + ("experts.down_proj" if projection == "down" else "experts.gate_up_proj")
            name = stem + "_blocks" if stem + "_blocks" in self._weight_map else stem
            info = self._info(name)
            need = info.nbytes // max(info.shape[0], 1) if info.shape else 0
        else:
            need = self._info(self._expert_name(layer, projection, 0)).nbytes
        return scratch if scratch.numel() >= need else torch.empty(need, dtype=torch.uint8)

    def expert_bias(self, layer: int, projection: str, *, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """Biases of every routed expert of ``projection``: ``[E, out]``, or None if the family has none.

        GPT-OSS ``gate_up_proj_bias [E, 2I]`` is de-interleaved like the weights (even = gate, odd = up).
        Biases are never folded into weights.
        """
        self._check_projection(projection)
        self._check_layer(layer)
        if not self.spec.expert_bias:
            return None
        e, i, h = self.spec.num_experts, self.spec.expert_intermediate_size, self.spec.hidden_size
        if projection == "down":
            return self._read_float(self._prefix(layer) + "experts.down_proj_bias", (e, h), dtype)
        both = self._read_float(self._prefix(layer) + "experts.gate_up_proj_bias", (e, 2 * i), dtype)
        start = 0 if projection == "gate" else 1
        return both[:, start::2].contiguous()

    # ---- experts as stored, and row ranges ----------------------------------------------------------
    def encoded_expert(self, layer: int, projection: str, expert: int) -> EncodedExpert:
        """One routed expert's weight in its stored encoding, not decoded (for fused decode passes and the
        quantisation-noise estimate).

        Parameters
        ----------
        layer, projection, expert
            As :meth:`expert_weight`.

        Returns
        -------
        EncodedExpert
            ``[out, in]`` orientation. MXFP4: uint8 blocks ``[out, in/32, 16]`` + scales ``[out, in/32]``;
            FP8 E4M3: uint8 codes ``[out, in]`` + float32 ``weight_scale_inv`` blocks; per-expert float
            tensors in their stored dtype; fused float layouts (GPT-OSS bf16, DBRX), stored transposed or
            interleaved, as a float32 ``[out, in]`` copy (a transpose cannot be fused into a streaming pass).

        Raises
        ------
        IndexError, CheckpointError
            As :meth:`expert_weight`; also CheckpointError naming layer, projection, expert, file and tensor
            when the expert holds NaN (an MXFP4 scale byte 0xFF, an FP8 code 0x7F/0xFF, a NaN or infinite
            FP8 block scale), before anything is computed from it.

        Notes
        -----
        Calls for one (layer, projection) share the memory guard of :meth:`iter_experts`: when resident memory
        has grown by more than about three decoded experts since the first call, freed heap pages are returned.
        """
        from lazarus_core.models.encoded import EncodedExpert

        self._check_read(layer, projection, expert)
        shape = self.projection_shape(projection)
        self._enforce_guard(layer, projection)
        if self._mxfp4_tensors(layer, projection) is not None:
            blocks, scales = self._mxfp4_rows(layer, projection, expert, 0, shape[0])
            return EncodedExpert("mxfp4", blocks.contiguous(), scales.contiguous(), None, shape)
        if self.spec.names.fused:
            return EncodedExpert("float", self._fused_expert(layer, projection, expert, torch.float32), None, None,
                                 shape)
        name = self._expert_name(layer, projection, expert)
        f, info = self._locate(name)
        if info.dtype == "F8_E4M3":
            codes, scale_inv, block, _ = self._fp8_rows(name, shape, 0, shape[0], self._what(layer, projection, expert))
            return EncodedExpert("fp8_e4m3", codes, scale_inv.float(), block, shape)
        self._expect(f, info, shape, FLOAT_DTYPES)
        return EncodedExpert("float", f.read(name), None, None, shape)

    def expert_rows(self, layer: int, projection: str, expert: int, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of one routed expert's ``[out, in]`` weight, decoded to float32, decoding only
        what covers those rows (for analyses that sweep all experts chunk by chunk).

        Per-expert tensors, fused MXFP4 and DBRX gate/up read only the bytes of those rows; FP8 E4M3 reads and
        decodes from the start of the scale block holding ``start`` to ``stop`` (at most ``block - 1`` extra
        rows; none when ``start`` is a multiple of the block, as in the cosine Gram's chunks); layouts stored
        transposed (GPT-OSS bf16, DBRX down) read the expert and convert only those rows.

        Parameters
        ----------
        layer, projection, expert
            As :meth:`expert_weight`.
        start, stop : int
            ``0 <= start <= stop <= out``.

        Returns
        -------
        torch.Tensor
            float32 ``[stop - start, in]``.

        Raises
        ------
        IndexError
            As :meth:`expert_weight`, or rows out of range.
        CheckpointError
            As :meth:`encoded_expert` (NaN in the rows read included). Shares its memory guard.
        """
        from lazarus_core.ops import fp8_dequant, mxfp4_dequant

        self._check_read(layer, projection, expert)
        out_dim, in_dim = shape = self.projection_shape(projection)
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= out_dim):
            raise IndexError(f"{self.source.name}: layer {layer} {projection}: rows {start}:{stop} out of range for "
                             f"an expert of shape {list(shape)}")
        self._enforce_guard(layer, projection)
        if self._mxfp4_tensors(layer, projection) is not None:
            blocks, scales = self._mxfp4_rows(layer, projection, expert, start, stop)
            return mxfp4_dequant(blocks, scales).view(stop - start, in_dim)
        if self.spec.names.fused:
            return self._fused_float_rows(layer, projection, expert, start, stop)
        name = self._expert_name(layer, projection, expert)
        f, info = self._locate(name)
        if info.dtype == "F8_E4M3":
            codes, scale_inv, block, first = self._fp8_rows(name, shape, start, stop,
                                                            self._what(layer, projection, expert))
            return fp8_dequant(codes, scale_inv, block_size=block)[start - first:]
        self._expect(f, info, shape, FLOAT_DTYPES)
        return f.read_rows(name, start, stop).to(torch.float32)

    def tensor_names(self) -> list[str]:
        """Every tensor of the checkpoint (all shards), in index order."""
        return list(self._weight_map)

    def tensor_info(self, name: str) -> TensorInfo:
        """Header entry (dtype, shape, byte range) of tensor ``name``, from its shard's validated header.

        Raises
        ------
        CheckpointError
            The tensor is not in the checkpoint, or its shard is missing or malformed.
        """
        return self._info(name)

    # ---- router and shared experts ------------------------------------------------------------------
    def router(self, layer: int, *, dtype: torch.dtype = torch.float32) -> RouterWeights:
        """The router of MoE layer ``layer``: weight ``[E, H]``, bias ``[E]`` (GPT-OSS), selection bias
        ``[E]`` (DeepSeek-V3 ``e_score_correction_bias``)."""
        self._check_layer(layer)
        e, h = self.spec.num_experts, self.spec.hidden_size
        base = self._prefix(layer) + self.spec.names.router
        weight = self._read_float(base + ".weight", (e, h), dtype)
        bias = self._read_float(base + ".bias", (e,), dtype) if self.spec.routing.router_bias else None
        selection = None
        if self.spec.routing.selection_bias:
            selection = self._read_float(base + ".e_score_correction_bias", (e,), dtype)
        return RouterWeights(weight, bias, selection)

    def shared_expert_weight(self, layer: int, projection: str, *, dtype: torch.dtype = torch.float32
                             ) -> torch.Tensor | None:
        """The shared (always-active) expert MLP's ``projection`` in ``[out, in]``, or None if the family has none.

        Shape ``[S, H]`` for gate/up, ``[H, S]`` for down, ``S = spec.shared_experts.intermediate_size``.
        """
        self._check_projection(projection)
        self._check_layer(layer)
        shared = self.spec.shared_experts
        if shared is None:
            return None
        s, h = shared.intermediate_size, self.spec.hidden_size
        name = f"{self._prefix(layer)}{shared.module}.{projection}_proj.weight"
        return self._read_linear(name, (h, s) if projection == "down" else (s, h), dtype)

    def shared_expert_gate(self, layer: int, *, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """Qwen2-MoE ``shared_expert_gate.weight [1, H]`` (output goes through a sigmoid), else None."""
        self._check_layer(layer)
        shared = self.spec.shared_experts
        if shared is None or shared.gate_module is None:
            return None
        return self._read_float(f"{self._prefix(layer)}{shared.gate_module}.weight", (1, self.spec.hidden_size), dtype)

    def close(self) -> None:
        """Close every open file (reading again reopens them)."""
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> "MoeCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"MoeCheckpoint({self.source.name!r}, family={self.family}, experts={self.num_experts}, "
                f"moe_layers={len(self.moe_layers)})")

    # ---- internals ----------------------------------------------------------------------------------
    def _check_projection(self, projection: str) -> None:
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")

    def _check_layer(self, layer: int) -> None:
        if not isinstance(layer, int) or layer not in self.spec.moe_layers:
            where = "dense" if isinstance(layer, int) and 0 <= layer < self.spec.num_layers else "out of range"
            raise IndexError(
                f"{self.source.name}: layer {layer} is {where} in this {self.family} checkpoint "
                f"({self.spec.num_layers} layers; MoE layers {list(self.spec.moe_layers)})"
            )

    def _check_expert(self, expert: int, layer: int) -> None:
        if not isinstance(expert, int) or not 0 <= expert < self.spec.num_experts:
            raise IndexError(f"{self.source.name}: layer {layer}: expert {expert} out of range "
                             f"(this {self.family} checkpoint has {self.spec.num_experts} experts)")

    def _check_read(self, layer: int, projection: str, expert: int) -> None:
        self._check_projection(projection)
        self._check_layer(layer)
        self._check_expert(expert, layer)

    @staticmethod
    def _what(layer: int, projection: str, expert: int) -> str:
        return f"layer {layer}, {projection}, expert {expert}"

    def _enforce_guard(self, layer: int, projection: str) -> None:
        """The memory guard of :meth:`iter_experts` for streams of per-call reads: the first call of a new
        (layer, projection) trims the heap and starts a budget of three decoded fp32 experts above that point
        (so nothing retained by an earlier stream is counted as the baseline); later calls enforce it."""
        if self._guard_key == (layer, projection) and self._guard is not None:
            self._guard.enforce()
            return
        rows, cols = self.projection_shape(projection)
        self._guard_key, self._guard = (layer, projection), ResidentBudget(3 * rows * cols * 4, trim_first=True)

    def _mxfp4_tensors(self, layer: int, projection: str
                       ) -> tuple[SafetensorsFile, TensorInfo, SafetensorsFile, TensorInfo] | None:
        """GPT-OSS MXFP4 ``(blocks file, blocks info, scales file, scales info)`` of one projection, shapes and
        dtypes checked (blocks ``[E, out, in/32, 16]``, scales ``[E, out, in/32]``, gate/up rows interleaved);
        None when the layer is not stored as MXFP4."""
        if not self.spec.names.fused or self.spec.names.layout == "dbrx":
            return None
        stem = self._prefix(layer) + ("experts.down_proj" if projection == "down" else "experts.gate_up_proj")
        if stem + "_blocks" not in self._weight_map:
            return None
        e, i, h = self.spec.num_experts, self.spec.expert_intermediate_size, self.spec.hidden_size
        rows, cols = (h, i) if projection == "down" else (2 * i, h)  # stored rows in [out, in] orientation
        bf, binfo = self._locate(stem + "_blocks")
        sf, sinfo = self._locate(stem + "_scales")
        if cols % 32:
            raise CheckpointError(f"{bf.path}: tensor {binfo.name!r}: MXFP4 needs the input size ({cols}) to be a "
                                  f"multiple of 32")
        self._expect(bf, binfo, (e, rows, cols // 32, 16), ("U8",))
        if sinfo.shape != binfo.shape[:-1] or sinfo.dtype != "U8":
            raise CheckpointError(
                f"{sf.path}: tensor {sinfo.name!r} ({sinfo.dtype} {list(sinfo.shape)}) does not match its MXFP4 "
                f"blocks {binfo.name!r} {list(binfo.shape)}: scales must be U8 of shape blocks.shape[:-1] "
                f"= {list(binfo.shape[:-1])}"
            )
        return bf, binfo, sf, sinfo

    def _mxfp4_rows(self, layer: int, projection: str, expert: int, start: int, stop: int,
                    scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """MXFP4 blocks ``[n, in/32, 16]`` and scales ``[n, in/32]`` of rows ``start:stop`` (n = stop - start) of
        one expert, reading only the stored rows spanning them (gate/up: a strided view of the interleaved
        span). Raises CheckpointError on a NaN scale (0xFF) among them."""
        bf, binfo, sf, sinfo = self._mxfp4_tensors(layer, projection)
        # gate/up rows are interleaved on disk (even = gate, odd = up): read the stored span, keep one parity.
        step, parity = (1, 0) if projection == "down" else (2, 0 if projection == "gate" else 1)
        first = expert * binfo.shape[1] + start * step
        last = first + (stop - start) * step
        blocks = bf.read_rows(binfo.name, first, last, axes=2, scratch=scratch)[parity::step]
        scales = sf.read_rows(sinfo.name, first, last, axes=2)[parity::step]
        if scales.numel() and int(scales.max()) == 0xFF:
            row, group = (scales == 0xFF).nonzero()[0].tolist()
            raise CheckpointError(
                f"{sf.path}: tensor {sinfo.name!r}: {self._what(layer, projection, expert)} holds NaN: MXFP4 scale "
                f"byte 0xFF (NaN in E8M0) at row {start + row}, columns {32 * group}..{32 * group + 31}")
        return blocks, scales

    def _fp8_rows(self, name: str, shape: tuple[int, int], start: int, stop: int, what: str,
                  scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], int]:
        """FP8 E4M3 codes of the scale-block rows covering rows ``start:stop`` of the ``[out, in]`` weight ``name``
        and their ``weight_scale_inv`` rows: ``(codes uint8 [stop - first, in], scale_inv, block, first)`` with
        ``first = start // block[0] * block[0]``. Shapes and dtypes checked; raises CheckpointError naming
        ``what`` on a NaN code (S.1111.111) or a NaN/infinite scale among them."""
        f, info = self._locate(name)
        self._expect(f, info, shape, ("F8_E4M3",))
        block = tuple(self.spec.fp8_block_size or (128, 128))
        scale_name = name + "_scale_inv"
        sf, sinfo = self._locate(scale_name)
        self._expect(sf, sinfo, (-(-shape[0] // block[0]), -(-shape[1] // block[1])), ("F32", "BF16", "F16"))
        first = start // block[0] * block[0]
        codes = f.read_rows(name, first, stop, scratch=scratch)
        scale_inv = sf.read_rows(scale_name, first // block[0], -(-stop // block[0]))
        nan = _first_fp8_nan(codes)
        if nan is not None:
            raise CheckpointError(f"{f.path}: tensor {name!r}: {what} holds NaN: FP8 E4M3 code "
                                  f"0x{int(codes.reshape(-1)[nan]):02X} at row {first + nan // shape[1]}, column "
                                  f"{nan % shape[1]}")
        if not bool(torch.isfinite(scale_inv).all()):
            row, col = (~torch.isfinite(scale_inv)).nonzero()[0].tolist()
            raise CheckpointError(f"{sf.path}: tensor {scale_name!r}: {what}: block scale "
                                  f"{float(scale_inv[row, col])} at block ({first // block[0] + row}, {col})")
        return codes, scale_inv, block, first

    def _fused_float_rows(self, layer: int, projection: str, expert: int, start: int, stop: int) -> torch.Tensor:
        """float32 rows ``start:stop`` of a fused float expert: DBRX gate/up read only those rows; layouts stored
        as ``[in, out]`` (GPT-OSS ``[E, H, 2I]`` interleaved / ``[E, I, H]``, DBRX ``w2``) read the expert once
        and convert only the columns that are those rows."""
        e, i, h = self.spec.num_experts, self.spec.expert_intermediate_size, self.spec.hidden_size
        if self.spec.names.layout == "dbrx":
            name = self._dbrx_name(layer, projection)
            f, info = self._locate(name)
            self._expect(f, info, (e * i, h), FLOAT_DTYPES)
            if projection != "down":
                return f.read_rows(name, expert * i + start, expert * i + stop).to(torch.float32)
            stored = f.read_rows(name, expert * i, (expert + 1) * i)  # [I, H]: down transposed
        else:
            stem = self._prefix(layer) + ("experts.down_proj" if projection == "down" else "experts.gate_up_proj")
            f, info = self._locate(stem)
            self._expect(f, info, (e, i, h) if projection == "down" else (e, h, 2 * i), FLOAT_DTYPES)
            stored = f.read_row(stem, expert)  # [in, out (gate/up interleaved)]
            if projection != "down":
                stored = stored[:, 0::2] if projection == "gate" else stored[:, 1::2]
        return stored[:, start:stop].t().to(torch.float32, memory_format=torch.contiguous_format)

    def _prefix(self, layer: int) -> str:
        return self.spec.names.moe_prefix(layer)

    def _dbrx_name(self, layer: int, projection: str) -> str:
        return f"{self._prefix(layer)}experts.mlp.{self.spec.names.projection_name(projection)}"

    def _expert_name(self, layer: int, projection: str, expert: int) -> str:
        return f"{self._prefix(layer)}experts.{expert}.{self.spec.names.projection_name(projection)}.weight"

    def _file(self, filename: str) -> SafetensorsFile:
        if filename not in self._files:
            try:
                path = self.source.local_path(filename)
            except FileNotFoundError as exc:
                raise CheckpointError(f"{exc} (named by {self.source.describe(self._index_name)})") from None
            self._files[filename] = SafetensorsFile(path)
        return self._files[filename]

    def _locate(self, name: str) -> tuple[SafetensorsFile, TensorInfo]:
        filename = self._weight_map.get(name)
        if filename is None:
            where = self.source.describe(self._index_name)
            raise CheckpointError(f"{where}: tensor {name!r} is missing from this {self.family} checkpoint")
        f = self._file(filename)
        return f, f.info(name)

    def _info(self, name: str) -> TensorInfo:
        return self._locate(name)[1]

    def _expect(self, f: SafetensorsFile, info: TensorInfo, shape: tuple[int, ...], dtypes: tuple[str, ...]) -> None:
        if info.dtype not in dtypes:
            raise CheckpointError(f"{f.path}: tensor {info.name!r} has dtype {info.dtype}; a {self.family} "
                                  f"checkpoint needs one of {list(dtypes)}")
        if info.shape != tuple(shape):
            raise CheckpointError(f"{f.path}: tensor {info.name!r} has shape {list(info.shape)}; this {self.family} "
                                  f"config implies {list(shape)}")

    def _read_float(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        f, info = self._locate(name)
        self._expect(f, info, shape, FLOAT_DTYPES)
        return f.read(name).to(dtype)

    def _read_linear(self, name: str, shape: tuple[int, int], dtype: torch.dtype, out: torch.Tensor | None = None,
                     scratch: torch.Tensor | None = None, what: str | None = None) -> torch.Tensor:
        """A linear weight ``[out, in]``: float (upcast) or FP8 E4M3 with ``weight_scale_inv`` blocks (``what``
        names it in a NaN error: the routed expert, or by default the tensor).

        ``scratch`` (raw bytes) is used only together with ``out``, so a result never aliases it."""
        f, info = self._locate(name)
        scratch = scratch if out is not None else None
        if info.dtype != "F8_E4M3":
            self._expect(f, info, shape, FLOAT_DTYPES)
            raw = f.read(name, scratch=scratch)
            return out.copy_(raw) if out is not None else raw.to(dtype).contiguous()
        from lazarus_core.ops import fp8_dequant

        weight, scale_inv, block, _ = self._fp8_rows(name, shape, 0, shape[0], what or f"tensor {name!r}", scratch)
        if dtype in (torch.float32, torch.bfloat16):
            return fp8_dequant(weight, scale_inv, block_size=block, dtype=dtype, out=out)
        decoded = fp8_dequant(weight, scale_inv, block_size=block).to(dtype)
        return out.copy_(decoded) if out is not None else decoded

    def _dbrx_expert(self, layer: int, projection: str, expert: int, dtype: torch.dtype,
                     out: torch.Tensor | None = None, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """DBRX ``experts.mlp.{w1,v1,w2} [E*I, H]``: expert e is rows ``e*I:(e+1)*I`` (only those bytes are
        read); gate (w1) / up (v1) are ``[out, in]`` as stored, w2 is down transposed."""
        e, i, h = self.spec.num_experts, self.spec.expert_intermediate_size, self.spec.hidden_size
        name = self._dbrx_name(layer, projection)
        f, info = self._locate(name)
        self._expect(f, info, (e * i, h), FLOAT_DTYPES)
        rows = f.read_rows(name, expert * i, (expert + 1) * i, scratch=scratch if out is not None else None)
        if projection == "down":
            rows = rows.t()
        return out.copy_(rows) if out is not None else rows.to(dtype).contiguous()

    def _fused_expert(self, layer: int, projection: str, expert: int, dtype: torch.dtype,
                      out: torch.Tensor | None = None, scratch: torch.Tensor | None = None) -> torch.Tensor:
        if self.spec.names.layout == "dbrx":
            return self._dbrx_expert(layer, projection, expert, dtype, out, scratch)
        e, i, h = self.spec.num_experts, self.spec.expert_intermediate_size, self.spec.hidden_size
        stem = self._prefix(layer) + ("experts.down_proj" if projection == "down" else "experts.gate_up_proj")
        rows = h if projection == "down" else 2 * i  # stored rows in [out, in] orientation
        cols = i if projection == "down" else h
        if self._mxfp4_tensors(layer, projection) is not None:
            # MXFP4: blocks [E, out, in/32, 16], scales [E, out, in/32], already [out, in]; gate/up rows interleaved.
            from lazarus_core.ops import mxfp4_dequant

            blocks, scales = self._mxfp4_rows(layer, projection, expert, 0, self.projection_shape(projection)[0],
                                              scratch if out is not None else None)
            if dtype in (torch.float32, torch.bfloat16):
                return mxfp4_dequant(blocks, scales, dtype=dtype, out=out)
            decoded = mxfp4_dequant(blocks, scales).to(dtype)
            return out.copy_(decoded) if out is not None else decoded
        # bf16/fp16/fp32: gate_up_proj [E, H, 2I] (gate/up interleaved on the last axis), down_proj [E, I, H].
        f, info = self._locate(stem)
        self._expect(f, info, (e, cols, rows), FLOAT_DTYPES)
        row = f.read_row(stem, expert, scratch=scratch if out is not None else None)  # [in, out(interleaved)]
        if projection != "down":
            row = row[:, 0::2] if projection == "gate" else row[:, 1::2]
        return out.copy_(row.t()) if out is not None else row.t().to(dtype).contiguous()


_FORMAT_NAMES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "F64": "fp64"}
_NAN_SCAN_BYTES = 1 << 18  # scan FP8 codes in cache-sized pieces


def _first_fp8_nan(codes: torch.Tensor) -> int | None:
    """Flat index of the first E4M3FN NaN code in uint8 ``codes`` (S.1111.111: 0x7F or 0xFF), or None.

    A byte is NaN exactly when its low seven bits are all set, i.e. when ``byte | 0x80 == 0xFF``, the largest
    uint8: one OR and one max per cache-sized piece. numpy, single-threaded: torch's threaded kernels spend
    more in their barrier than in the work on pieces this small (17x slower here on a loaded machine)."""
    flat = codes.reshape(-1).numpy()
    buf = np.empty(min(flat.size, _NAN_SCAN_BYTES), dtype=np.uint8)
    for begin in range(0, flat.size, _NAN_SCAN_BYTES):
        piece = flat[begin:begin + _NAN_SCAN_BYTES]
        marked = np.bitwise_or(piece, 0x80, out=buf[:piece.size])
        if marked.max() == 0xFF:
            return begin + int(np.flatnonzero(marked == 0xFF)[0])
    return None


def open_moe_checkpoint(model: str | os.PathLike, *, revision: str | None = None) -> MoeCheckpoint:
    """Open an MoE checkpoint for streaming expert access.

    Parameters
    ----------
    model : str or PathLike
        A local directory (``config.json`` + ``model.safetensors`` or a sharded
        ``model.safetensors.index.json``), a built-in alias (e.g. ``"demo:native"``), or a Hugging Face
        model id. For a hub id only ``config.json``, the index and the shards holding tensors that are
        actually read are downloaded (lazily, per file); the cache and ``HF_HUB_OFFLINE=1`` are respected.
    revision : str, optional
        Hub branch, tag or commit.

    Returns
    -------
    MoeCheckpoint

    Raises
    ------
    ModelNotFoundError
        No such directory/alias/hub model, missing ``config.json``, or an offline cache miss.
    UnsupportedModelError
        Not a supported MoE family (the message lists the supported ones).
    UnsafeCheckpointError
        Only pickle (``.bin``) weights: refused, never loaded.
    CheckpointError
        Malformed index or safetensors header (names the file and tensor).
    """
    return MoeCheckpoint(resolve_model(model, revision=revision))
