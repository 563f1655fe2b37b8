"""Choosing the rank of every (layer, projection): a fixed rank, per-projection ranks, an energy fraction,
or a target compression ratio allocated where it keeps the most delta energy per byte."""

from __future__ import annotations

import heapq
from dataclasses import asdict, dataclass

from lazarus_core.models.checkpoint import PROJECTIONS
from lazarus_core.overlay.sizes import dtype_bytes, overlay_projection_bytes
from lazarus_core.spectra import ProjectionSpectrum

# --preset -> energy fraction kept by every expert (ProjectionSpectrum.kept_energy; the ratio it gives is reported
# on the model at hand).
PRESETS = {"fast": 0.90, "balanced": 0.95, "quality": 0.99}


@dataclass
class RankPolicy:
    """How ranks are chosen; exactly one of rank / per-projection ranks / energy / target_ratio applies.

    Attributes
    ----------
    rank : int or None
        Same rank everywhere.
    projection_ranks : dict or None
        ``{"gate": r, "up": r, "down": r}`` (missing ones fall back to ``rank``).
    energy : float or None
        In (0, 1]: per (layer, projection), the smallest rank at which every expert keeps this fraction of
        its delta energy (delta from the overlay base; only components above the quantisation-noise edge
        count, all components for float sources: ``ProjectionSpectrum.kept_energy``).
    target_ratio : float or None
        Expert bytes (as stored) / overlay expert bytes to reach; ranks allocated greedily by delta energy
        (fraction of the projection's expert weight energy) gained per byte.
    preset : str or None
        ``fast``/``balanced``/``quality`` when the energy came from a preset.
    """

    rank: int | None = None
    projection_ranks: dict[str, int] | None = None
    energy: float | None = None
    target_ratio: float | None = None
    preset: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        if self.target_ratio is not None:
            return f"target ratio {self.target_ratio:g}x"
        if self.energy is not None:
            return (f"preset {self.preset} (" if self.preset else "") + f"energy {self.energy:g}" + \
                (")" if self.preset else "")
        if self.projection_ranks:
            return "ranks " + "/".join(f"{p}={r}" for p, r in self.projection_ranks.items())
        return f"rank {self.rank}"


def make_policy(*, rank: int | None = None, gate_rank: int | None = None, up_rank: int | None = None,
                down_rank: int | None = None, energy: float | None = None, target_ratio: float | None = None,
                preset: str | None = None) -> RankPolicy:
    """Validate the CLI's rank options into a :class:`RankPolicy` (default: preset ``balanced``).

    Raises
    ------
    ValueError
        Conflicting options or values out of range (the message names the flag).
    """
    per = {p: r for p, r in (("gate", gate_rank), ("up", up_rank), ("down", down_rank)) if r is not None}
    chosen = [name for name, v in (("--rank/--gate-rank/--up-rank/--down-rank", rank if rank is not None else
                                    (per or None)), ("--energy", energy), ("--target-ratio", target_ratio),
                                   ("--preset", preset)) if v is not None]
    if len(chosen) > 1:
        raise ValueError(f"choose one of {', '.join(chosen)}")
    for name, r in [("--rank", rank)] + [(f"--{p}-rank", r) for p, r in per.items()]:
        if r is not None and r < 0:
            raise ValueError(f"{name} must be >= 0, got {r}")
    if per:
        missing = [p for p in PROJECTIONS if p not in per]
        if missing and rank is None:
            raise ValueError(f"give --{'-rank, --'.join(missing)}-rank too (or --rank for the rest)")
        return RankPolicy(rank=rank, projection_ranks={p: per.get(p, rank) for p in PROJECTIONS})
    if rank is not None:
        return RankPolicy(rank=rank)
    if energy is not None:
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"--energy must be in (0, 1], got {energy}")
        return RankPolicy(energy=energy)
    if target_ratio is not None:
        if target_ratio <= 0:
            raise ValueError(f"--target-ratio must be > 0, got {target_ratio}")
        return RankPolicy(target_ratio=target_ratio)
    preset = preset or "balanced"
    if preset not in PRESETS:
        raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}")
    return RankPolicy(energy=PRESETS[preset], preset=preset)


def choose_ranks(policy: RankPolicy, spectra: dict[tuple[int, str], ProjectionSpectrum], *, dtype: str,
                 has_bias: bool, original_expert_bytes: int | None = None, base_dtype: str | None = None
                 ) -> dict[tuple[int, str], int]:
    """Ranks per (layer, projection) under ``policy``.

    Parameters
    ----------
    policy : RankPolicy
    spectra : dict
        (layer, projection) -> :class:`ProjectionSpectrum` of the layers to compress.
    dtype : str
        Overlay dtype (for the byte costs of ``target_ratio``).
    has_bias : bool
        The source has expert biases (counted in the overlay bytes).
    original_expert_bytes : int, optional
        Bytes of those layers' experts as stored (needed by ``target_ratio``).

    Raises
    ------
    ValueError
        ``target_ratio`` unreachable (the bases alone exceed the budget; the message gives the best ratio).
    """
    if policy.target_ratio is not None:
        return _allocate(policy.target_ratio, spectra, dtype, has_bias, original_expert_bytes, base_dtype)
    ranks = {}
    for key, sp in spectra.items():
        if policy.energy is not None:
            r = sp.energy_rank(policy.energy)
        elif policy.projection_ranks:
            r = policy.projection_ranks[key[1]]
        else:
            r = policy.rank
        ranks[key] = min(int(r), sp.max_rank)
    return ranks


def _allocate(target: float, spectra, dtype, has_bias, original, base_dtype=None) -> dict[tuple[int, str], int]:
    if original is None:
        raise ValueError("--target-ratio needs the original expert bytes")
    budget = original / target
    fixed = sum(overlay_projection_bytes(sp.shape, sp.num_experts, 0, has_bias, dtype, base_dtype)
                for sp in spectra.values())
    if fixed > budget:
        raise ValueError(f"--target-ratio {target:g} is unreachable: the bases alone give {original / fixed:.2f}x")
    ranks = {key: 0 for key in spectra}
    gains = {key: sp.component_gain() for key, sp in spectra.items()}
    cost = {key: sp.num_experts * sum(sp.shape) * dtype_bytes(dtype) for key, sp in spectra.items()}
    heap = [(-float(gains[k][0]) / cost[k], k) for k, sp in spectra.items() if sp.max_rank > 0]
    heapq.heapify(heap)
    spent = fixed
    while heap:
        _, key = heapq.heappop(heap)
        if spent + cost[key] > budget:
            continue  # this group's next component does not fit; cheaper groups may still
        spent += cost[key]
        ranks[key] += 1
        if ranks[key] < spectra[key].max_rank:
            heapq.heappush(heap, (-float(gains[key][ranks[key]]) / cost[key], key))
    return ranks
