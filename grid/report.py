"""Grid results as the paper shows them: a table, one heatmap per metric, a correlation plot.

Rows are (cell, seed) with the axis values and every metric. Metric names carry their
family as a prefix (`understanding/...`, `generation/...`); the heatmaps put the first axis
on rows and the second on columns (MetaMorph Figure 7: VQA data down, generation data
across) and average over seeds; the correlation plot scatters every understanding metric
against every generation metric across cells with Pearson's r (Figure 8).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_report"]


def _metric_names(rows: list[dict[str, Any]]) -> list[str]:
    names = sorted({k for r in rows for k in r if k.startswith(("understanding/", "generation/"))})
    return names


def _slug(name: str) -> str:
    return name.replace("/", "_")


def _heatmap(path: Path, metric: str, axes: list[str], labels: list[list[str]], grid: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * grid.shape[1], 1.2 + 1.0 * grid.shape[0]))
    from matplotlib import patheffects

    lower_is_better = "frechet" in metric or "loss" in metric
    im = ax.imshow(grid, cmap="viridis_r" if lower_is_better else "viridis", aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        ax.text(
            j,
            i,
            "—" if np.isnan(v) else f"{v:.3g}",
            ha="center",
            va="center",
            color="white",
            fontsize=10,
            path_effects=[patheffects.withStroke(linewidth=2, foreground="black")],
        )
    ax.set_xticks(range(grid.shape[1]), labels[1])
    ax.set_yticks(range(grid.shape[0]), labels[0])
    ax.set_xlabel(axes[1] if len(axes) > 1 else "")
    ax.set_ylabel(axes[0])
    ax.set_title(metric + (" (lower is better)" if lower_is_better else ""), fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _correlations(path: Path, table, understanding: list[str], generation: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(
        len(understanding), len(generation), squeeze=False, figsize=(3.2 * len(generation), 2.8 * len(understanding))
    )
    for i, u in enumerate(understanding):
        for j, g in enumerate(generation):
            ax = axs[i][j]
            x, y = table[u].to_numpy(float), table[g].to_numpy(float)
            ok = ~(np.isnan(x) | np.isnan(y))
            ax.scatter(x[ok], y[ok], s=24)
            r = (
                np.corrcoef(x[ok], y[ok])[0, 1]
                if ok.sum() > 2 and x[ok].std() > 0 and y[ok].std() > 0
                else float("nan")
            )
            ax.set_title(f"r = {r:.2f}", fontsize=9)
            ax.set_xlabel(u, fontsize=8)
            ax.set_ylabel(g, fontsize=8)
    fig.suptitle("understanding metrics vs generation metrics, one point per cell and seed", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(
    out: Path,
    rows: list[dict[str, Any]],
    axes: list[str],
    axis_values: dict[str, list[Any]],
    failed: list[dict[str, Any]] | None = None,
) -> dict[str, Path]:
    """Write results.csv/.parquet, heatmap_*.png (+ heatmaps.json), correlation.png, report.md into `out`."""
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows)
    files = {"csv": out / "results.csv", "parquet": out / "results.parquet"}
    table.to_csv(files["csv"], index=False)
    table.astype({a: str for a in axes if a in table}).to_parquet(files["parquet"], index=False)
    metrics = _metric_names(rows)
    labels = [[str(v) for v in axis_values[a]] for a in axes[:2]] + ([[""]] if len(axes) < 2 else [])
    md = ["# Grid report", "", f"{len(table)} runs over axes " + " × ".join(f"`{a}`" for a in axes) + ".", ""]
    if failed:
        md += ["**Failed cells:** " + ", ".join(f"`{f['cell']}` ({f['error']})" for f in failed), ""]
    heatmaps: dict[str, Any] = {
        "rows": {"axis": axes[0], "values": labels[0]},
        "columns": {"axis": axes[1] if len(axes) > 1 else None, "values": labels[1]},
        "metrics": {},
    }
    for metric in metrics:
        grid = np.full((len(labels[0]), len(labels[1])), np.nan)
        for i, vi in enumerate(labels[0]):
            for j, vj in enumerate(labels[1]):
                sel = table[axes[0]].astype(str) == vi
                if len(axes) > 1:
                    sel &= table[axes[1]].astype(str) == vj
                vals = table.loc[sel, metric].dropna() if metric in table else []
                if len(vals):
                    grid[i, j] = float(np.mean(vals))
        path = out / f"heatmap_{_slug(metric)}.png"
        _heatmap(path, metric, axes, labels, grid)
        files[f"heatmap:{metric}"] = path
        heatmaps["metrics"][metric] = [[None if np.isnan(v) else float(v) for v in row] for row in grid]
        md += [f"## {metric}", "", f"![{metric}]({path.name})", ""]
    files["heatmaps"] = out / "heatmaps.json"  # the numbers behind every heatmap, for re-plotting
    files["heatmaps"].write_text(json.dumps(heatmaps, indent=1), encoding="utf-8")
    understanding = [m for m in metrics if m.startswith("understanding/")]
    generation = [m for m in metrics if m.startswith("generation/")]
    if understanding and generation and len(table) > 1:
        files["correlation"] = out / "correlation.png"
        _correlations(files["correlation"], table, understanding, generation)
        md += ["## Understanding vs generation", "", "![correlation](correlation.png)", ""]
    shown = [c for c in [*axes, "seed", *metrics] if c in table]
    md += ["## Table", "", "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for _, r in table.iterrows():
        md.append("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in shown) + " |")
    files["markdown"] = out / "report.md"
    files["markdown"].write_text("\n".join(md) + "\n", encoding="utf-8")
    return files
