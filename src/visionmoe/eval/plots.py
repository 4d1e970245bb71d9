"""PNG figures of MoE routing, after the V-MoE paper and blog.

Shape legend: n example images, L tokens per image (prefix tokens first), E experts.

Every function writes one PNG and returns its path. matplotlib is imported inside each function
and forced onto the Agg backend, so importing this module costs nothing and plotting works on
headless machines (CI, clusters) without a display.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from visionmoe.eval.routing_stats import RoutingStats

__all__ = [
    "expert_colors",
    "plot_capacity_sweep",
    "plot_class_expert_heatmap",
    "plot_dropped_maps",
    "plot_expert_load",
    "plot_patch_experts",
]

DROPPED_COLOR = (0.0, 0.0, 0.0, 0.85)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # No "Software" text chunk: it carries a URL, and reports promise to contain none.
    fig.savefig(path, dpi=100, bbox_inches="tight", metadata={"Software": None})
    _pyplot().close(fig)
    return path


def expert_colors(num_experts: int) -> np.ndarray:
    """(E, 4) RGBA colours that stay distinguishable: tab10/tab20 when they suffice.

    Beyond 20 experts no qualitative palette has enough hues, so colours are sampled evenly from
    a cyclic map; neighbouring ids then look alike, which is the honest limit of a colour legend.
    """
    import matplotlib

    if num_experts <= 10:
        cmap = matplotlib.colormaps["tab10"]
        return np.array([cmap(i) for i in range(num_experts)])
    if num_experts <= 20:
        cmap = matplotlib.colormaps["tab20"]
        return np.array([cmap(i) for i in range(num_experts)])
    cmap = matplotlib.colormaps["hsv"]
    return np.array([cmap(i / num_experts) for i in range(num_experts)])


def _grid_shape(grid_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(grid_size, (int, np.integer)):
        return int(grid_size), int(grid_size)
    gh, gw = grid_size
    return int(gh), int(gw)


def _show_image(ax: Any, image: np.ndarray) -> tuple[int, int]:
    """Draw a uint8 (H, W, C) image (C=1 in grey) and return (H, W) for overlay extents."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])
    return image.shape[0], image.shape[1]


def _patch_overlay(
    ax: Any,
    image: np.ndarray,
    expert_grid: np.ndarray | None,
    kept_grid: np.ndarray,
    colors: np.ndarray | None,
    alpha: float = 0.55,
) -> None:
    """Image with each patch tinted by its expert (if given) and dropped patches blacked out."""
    from matplotlib.patches import Rectangle

    H, W = _show_image(ax, image)
    gh, gw = kept_grid.shape
    rgba = np.zeros((gh, gw, 4))
    if expert_grid is not None and colors is not None:
        valid = expert_grid >= 0
        rgba[valid] = colors[expert_grid[valid]]
        rgba[..., 3] = np.where(valid, alpha, 0.0)
    rgba[~kept_grid] = DROPPED_COLOR
    ax.imshow(rgba, extent=(-0.5, W - 0.5, H - 0.5, -0.5), interpolation="nearest")
    ph, pw = H / gh, W / gw
    for r, c in zip(*np.nonzero(~kept_grid), strict=True):
        ax.add_patch(
            Rectangle(
                (c * pw - 0.5, r * ph - 0.5), pw, ph, fill=False, hatch="///", ec="white", lw=0
            )
        )
    for r in range(1, gh):
        ax.axhline(r * ph - 0.5, color="white", lw=0.3, alpha=0.6)
    for c in range(1, gw):
        ax.axvline(c * pw - 0.5, color="white", lw=0.3, alpha=0.6)
    ax.set_xlim(-0.5, W - 0.5)
    ax.set_ylim(H - 0.5, -0.5)


def plot_expert_load(stats: RoutingStats, path: str | Path) -> Path:
    """Bar chart of the fraction of kept assignments per expert, one panel per sparse layer.

    The dashed line is the uniform load 1/E: bars far above it are the overloaded experts whose
    buffers overflow first when capacity is reduced.
    """
    plt = _pyplot()
    layers = stats.sparse_layers
    if not layers:
        raise ValueError("stats have no sparse MoE layers to plot")
    width = max(3.2, 0.35 * max(stats.layers[i].num_experts for i in layers))
    fig, axes = plt.subplots(1, len(layers), figsize=(width * len(layers), 3.0), squeeze=False)
    for ax, index in zip(axes[0], layers, strict=True):
        layer = stats.layers[index]
        E = layer.num_experts
        ax.bar(np.arange(E), layer.load, color=expert_colors(E))
        ax.axhline(1.0 / E, color="black", ls="--", lw=1, label="uniform")
        ax.set_title(f"block {index}: load CV$^2$ {_cv2(layer.load):.3f}", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_xticks(np.arange(E) if E <= 32 else np.arange(0, E, max(1, E // 16)))
        ax.set_ylim(0, max(float(layer.load.max(initial=0.0)) * 1.15, 1.5 / E))
    axes[0, 0].set_ylabel("fraction of kept assignments")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Expert load", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _cv2(x: np.ndarray) -> float:
    mean = float(np.mean(x)) if np.size(x) else 0.0
    return float(np.var(x) / mean**2) if mean else 0.0


def plot_class_expert_heatmap(
    matrix: np.ndarray, class_names: Sequence[str], layer: int, path: str | Path
) -> Path:
    """Class x expert heatmap: for each class, where its patch tokens' first choices go.

    This is the V-MoE blog's specialisation figure: a row concentrated on few experts means the
    router sends that class to specialists; a flat row means the layer does not discriminate it.
    Cells are annotated while they remain legible (up to 600 cells).
    """
    plt = _pyplot()
    matrix = np.asarray(matrix, dtype=np.float64)
    C, E = matrix.shape
    if len(class_names) != C:
        raise ValueError(f"{len(class_names)} class names for a matrix with {C} rows")
    fig, ax = plt.subplots(figsize=(min(2.0 + 0.5 * E, 24.0), min(1.5 + 0.35 * C, 30.0)))
    vmax = max(float(matrix.max(initial=0.0)), 1e-9)
    im = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
    fig.colorbar(im, ax=ax, label="fraction of the class's patches")
    ax.set_xticks(np.arange(E))
    ax.set_xticklabels([str(e) for e in range(E)], fontsize=7)
    ax.set_yticks(np.arange(C))
    ax.set_yticklabels([str(n) for n in class_names], fontsize=7)
    ax.set_xlabel("expert")
    ax.set_ylabel("class")
    ax.set_title(f"Block {layer}: top-choice expert per class", fontsize=10)
    if C * E <= 600:
        for r in range(C):
            for c in range(E):
                value = matrix[r, c]
                color = "black" if value > 0.6 * vmax else "white"
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=6, color=color)
    return _save(fig, path)


def _token_grid(row: np.ndarray, num_prefix: int, grid: tuple[int, int]) -> np.ndarray:
    gh, gw = grid
    patches = np.asarray(row)[num_prefix:]
    if patches.size != gh * gw:
        raise ValueError(
            f"{patches.size} patch tokens (after {num_prefix} prefix) do not fill a {gh}x{gw} grid"
        )
    return patches.reshape(gh, gw)


def plot_patch_experts(
    images_uint8: np.ndarray,
    top1: np.ndarray,
    kept: np.ndarray,
    grid_size: int | Sequence[int],
    num_prefix: int,
    num_experts: int,
    path: str | Path,
    title: str | None = None,
) -> Path:
    """Example images (top row) above their patch grids coloured by top-choice expert (bottom).

    ``top1`` and ``kept`` are ``(n, L)`` including prefix tokens, which are skipped. Dropped
    patches are black and hatched, so the two failure modes of a router (wrong expert, no expert)
    are visible at once. Expert-choice tokens that no expert picked have ``top1 = -1`` and are
    dropped by construction.
    """
    plt = _pyplot()
    from matplotlib.patches import Patch

    images_uint8 = np.asarray(images_uint8)
    n = images_uint8.shape[0]
    if n == 0:
        raise ValueError("no images to plot")
    grid = _grid_shape(grid_size)
    colors = expert_colors(num_experts)
    fig, axes = plt.subplots(2, n, figsize=(1.9 * n + 1.6, 4.0), squeeze=False)
    for j in range(n):
        _show_image(axes[0, j], images_uint8[j])
        experts = _token_grid(top1[j], num_prefix, grid)
        keep = _token_grid(kept[j], num_prefix, grid).astype(bool)
        _patch_overlay(axes[1, j], images_uint8[j], experts, keep, colors)
    handles = [Patch(color=colors[e], label=f"expert {e}") for e in range(min(num_experts, 20))]
    handles.append(Patch(facecolor="black", hatch="///", edgecolor="white", label="dropped"))
    fig.legend(
        handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False
    )
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_dropped_maps(
    images_uint8: np.ndarray,
    kept_by_cf: Mapping[float, np.ndarray],
    grid_size: int | Sequence[int],
    num_prefix: int,
    path: str | Path,
    title: str | None = None,
) -> Path:
    """Which patches survive as capacity shrinks: rows are images, columns capacity factors.

    Dropped patches are blacked out. Under Batch Priority Routing the survivors should be the
    object rather than the background, the qualitative claim behind BPR's compute savings.
    """
    plt = _pyplot()
    images_uint8 = np.asarray(images_uint8)
    n = images_uint8.shape[0]
    cfs = sorted(kept_by_cf)
    if n == 0 or not cfs:
        raise ValueError("need at least one image and one capacity factor")
    grid = _grid_shape(grid_size)
    cols = len(cfs) + 1
    fig, axes = plt.subplots(n, cols, figsize=(1.8 * cols, 1.8 * n + 0.4), squeeze=False)
    for i in range(n):
        _show_image(axes[i, 0], images_uint8[i])
        for j, cf in enumerate(cfs, start=1):
            keep = _token_grid(np.asarray(kept_by_cf[cf])[i], num_prefix, grid).astype(bool)
            _patch_overlay(axes[i, j], images_uint8[i], None, keep, None)
            if i == n - 1:
                axes[i, j].set_xlabel(f"{1.0 - keep.mean():.0%} dropped", fontsize=7)
    axes[0, 0].set_title("image", fontsize=8)
    for j, cf in enumerate(cfs, start=1):
        axes[0, j].set_title(f"C = {cf:g}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_capacity_sweep(
    cfs: Sequence[float],
    acc_vanilla: Sequence[float],
    acc_bpr: Sequence[float] | None,
    path: str | Path,
    compute: Sequence[float] | None = None,
) -> Path:
    """Accuracy as the eval capacity factor shrinks, vanilla routing vs Batch Priority Routing.

    With ``compute`` (the fraction of expert compute actually spent at each capacity factor) a
    second panel plots accuracy against compute, the V-MoE adaptive-compute trade-off curve.
    ``acc_bpr`` may be None for routers without BPR (expert choice).
    """
    plt = _pyplot()
    order = np.argsort(np.asarray(cfs, dtype=np.float64))
    x = np.asarray(cfs, dtype=np.float64)[order]
    vanilla = np.asarray(acc_vanilla, dtype=np.float64)[order]
    bpr = None if acc_bpr is None else np.asarray(acc_bpr, dtype=np.float64)[order]
    panels = 2 if compute is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.2), squeeze=False)
    ax = axes[0, 0]
    ax.plot(x, vanilla, "o-", label="vanilla routing")
    if bpr is not None:
        ax.plot(x, bpr, "s-", label="batch priority routing")
    ax.set_xscale("log", base=2)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{v:g}" for v in x])
    ax.set_xlabel("eval capacity factor")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if compute is not None:
        spent = np.asarray(compute, dtype=np.float64)[order]
        ax2 = axes[0, 1]
        ax2.plot(spent, vanilla, "o-", label="vanilla routing")
        if bpr is not None:
            ax2.plot(spent, bpr, "s-", label="batch priority routing")
        ax2.set_xlabel("fraction of expert compute used")
        ax2.set_ylabel("accuracy")
        ax2.grid(alpha=0.3)
    fig.suptitle("Accuracy vs capacity", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
