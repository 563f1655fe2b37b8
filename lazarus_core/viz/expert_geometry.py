"""Views of expert geometry: a 2-D classical MDS of the cosine geometry and a cosine heatmap, in the
terminal (rich) and as a matplotlib figure with the cumulative delta-energy curves and ranks by layer."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lazarus_core.analysis.expert_structure import MoeTypeReport

_SHADES = " .:-=+*#%@"


def classical_mds(cosine: torch.Tensor, dims: int = 2) -> torch.Tensor:
    """Embed experts in ``dims`` dimensions so distances match ``sqrt(2 - 2 cos)``.

    Parameters
    ----------
    cosine : torch.Tensor
        ``[E, E]`` cosine similarities.

    Returns
    -------
    torch.Tensor
        float64 ``[E, dims]`` coordinates (zeros where the geometry has fewer dimensions).
    """
    c = cosine.to(torch.float64)
    n = c.shape[0]
    d2 = (2.0 - 2.0 * c).clamp_min(0.0)
    j = torch.eye(n, dtype=torch.float64) - 1.0 / n
    b = -0.5 * j @ d2 @ j
    vals, vecs = torch.linalg.eigh(b)
    vals, vecs = vals.flip(0)[:dims].clamp_min(0.0), vecs.flip(1)[:, :dims]
    coords = vecs * vals.sqrt()
    if coords.shape[1] < dims:
        coords = torch.cat([coords, torch.zeros(n, dims - coords.shape[1], dtype=torch.float64)], 1)
    return coords


def render_mds(cosine: torch.Tensor, width: int = 48, height: int = 16) -> str:
    """ASCII scatter of the 2-D MDS embedding; each expert is drawn by its index (mod 36 as 0-9a-z)."""
    coords = classical_mds(cosine)
    grid = [[" "] * width for _ in range(height)]
    lo, hi = coords.min(0).values, coords.max(0).values
    span = (hi - lo).clamp_min(1e-12)
    symbols = "0123456789abcdefghijklmnopqrstuvwxyz"
    for e, (x, y) in enumerate(coords.tolist()):
        col = int(round((x - lo[0].item()) / span[0].item() * (width - 1)))
        row = int(round((y - lo[1].item()) / span[1].item() * (height - 1)))
        grid[height - 1 - row][col] = symbols[e % len(symbols)]
    border = "+" + "-" * width + "+"
    return "\n".join([border, *("|" + "".join(r) + "|" for r in grid), border])


def render_heatmap(cosine: torch.Tensor) -> str:
    """Cosine matrix as shaded characters: ' ' for <= 0 up to '@' for 1 (diagonal included)."""
    c = cosine.clamp(0.0, 1.0)
    lines = []
    for row in c.tolist():
        lines.append("".join(_SHADES[min(len(_SHADES) - 1, int(v * (len(_SHADES) - 1) + 0.5))] * 2 for v in row))
    return "\n".join(lines)


def plot_report(report: "MoeTypeReport", path: str | Path) -> Path:
    """Write a figure (png or pdf, by suffix): cumulative delta-energy curves per projection and layer,
    95%-energy rank by layer, and the cosine heatmap of the first analysed layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise ValueError(f"--plot must end in .png, .pdf or .svg, got {path.name!r}")
    projections = ("gate", "up", "down")
    fig, axes = plt.subplots(1, 5, figsize=(22, 4.2))
    for ax, proj in zip(axes[:3], projections):
        for layer in report.layers:
            curve = layer.projections[proj].energy_curve
            ax.plot(range(1, len(curve) + 1), curve, label=f"L{layer.layer}", lw=1)
        ax.axhline(0.95, color="grey", ls=":", lw=0.8)
        ax.set(title=f"{proj}: cumulative delta energy", xlabel="rank", ylabel="energy fraction", ylim=(0, 1.02))
    if len(report.layers) <= 12:
        axes[0].legend(fontsize=7)
    for proj in projections:
        xs = [layer.layer for layer in report.layers]
        ys = [layer.projections[proj].rank_ratio for layer in report.layers]
        axes[3].plot(xs, ys, marker="o", label=proj)
    axes[3].set(title="rank_95 / max rank by layer", xlabel="layer", ylim=(0, 1.02))
    axes[3].legend(fontsize=7)
    first = report.layers[0]
    image = axes[4].imshow(torch.tensor(first.projections["gate"].cosine_matrix), vmin=-1, vmax=1, cmap="RdBu_r")
    axes[4].set(title=f"layer {first.layer} gate: expert cosine", xlabel="expert", ylabel="expert")
    fig.colorbar(image, ax=axes[4], fraction=0.046)
    fig.suptitle(f"{report.model}: {report.moe_type} (confidence {report.confidence:.2f})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    from lazarus_core.atomic_io import atomic_path

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=path.suffix[1:].lower() or "png")
    finally:
        plt.close(fig)
    return path
