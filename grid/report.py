"""Grid results as the paper shows them, with their uncertainty, and what they say.

Rows are (cell, seed) with the axis values and every metric. Metric names carry their
family as a prefix (`understanding/...`, `generation/...`); the heatmaps put the first axis
on rows and the second on columns (MetaMorph Figure 7: VQA data down, generation data
across) and show each cell's mean over seeds with its spread (the standard deviation between
seeds); the correlation plot scatters every understanding metric against every generation
metric across cells with Pearson's r (Figure 8).

Beyond the figures: `findings` states the effect of each axis on the key metrics in words
computed from the numbers (paired by the other axis and the seed, mean ± standard error), the
understanding/generation asymmetry MetaMorph reports among them; `grid.law` fits a mixing
law per metric, measures it by leave-one-cell-out, draws the Pareto front between the key
understanding and generation metrics and predicts the best split of a sample budget.
"""

from __future__ import annotations

import dataclasses
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


def _heatmap(
    path: Path, metric: str, axes: list[str], labels: list[list[str]], grid: np.ndarray, spread: np.ndarray
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * grid.shape[1], 1.2 + 1.0 * grid.shape[0]))
    from matplotlib import patheffects

    lower_is_better = "frechet" in metric or "loss" in metric
    im = ax.imshow(grid, cmap="viridis_r" if lower_is_better else "viridis", aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        sd = spread[i, j]
        ax.text(
            j,
            i,
            "—" if np.isnan(v) else f"{v:.3g}" + ("" if np.isnan(sd) else f"\n± {sd:.2g}"),
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
    ax.set_title(metric + (" (lower is better)" if lower_is_better else "") + "\nmean ± sd over seeds", fontsize=9)
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


UNDERSTANDING_KEYS = ("understanding/exact_match", "understanding/mc_accuracy", "understanding/text_loss")
GENERATION_KEYS = ("generation/judge/colour_at_position", "generation/judge/background", "generation/cosine")


def _lower_is_better(metric: str) -> bool:
    return "loss" in metric or "frechet" in metric


def _varies(rows: list[dict[str, Any]], metric: str) -> bool:
    vals = [r[metric] for r in rows if isinstance(r.get(metric), (int, float))]
    return len(vals) > 1 and max(vals) > min(vals)


def _informative(rows: list[dict[str, Any]], metric: str) -> bool:
    """Measured, varying across the runs, and above its chance level where it has one."""
    if not _varies(rows, metric):
        return False
    base = [r[f"{metric}/chance"] for r in rows if isinstance(r.get(f"{metric}/chance"), (int, float))]
    return not base or float(np.mean([r[metric] for r in rows if metric in r])) > float(np.mean(base))


def key_metrics(rows: list[dict[str, Any]]) -> tuple[str | None, str | None]:
    """(understanding, generation) metric a grid is judged by: the first of each family's keys that the
    grid measured, that varies across its runs and that beats its chance level (a metric stuck at one
    value or at chance says nothing)."""
    return tuple(
        next((m for m in keys if _informative(rows, m)), None) for keys in (UNDERSTANDING_KEYS, GENERATION_KEYS)
    )


def _role(axis: str, index: int) -> str:
    """'understanding' or 'generation': by the axis's name, else by its place (rows, then columns)."""
    for role in ("understanding", "generation"):
        if role in axis:
            return role
    return ("understanding", "generation")[min(index, 1)]


def _short(name: str) -> str:
    return name.split("/", 1)[-1].replace("judge/", "").replace("_", " ")


def _paired_effect(rows: list[dict[str, Any]], axes: list[str], axis: str, metric: str) -> dict[str, Any] | None:
    """metric(axis at its largest) - metric(axis at its smallest), paired by the other axes and the
    seed: mean, standard error, pairs, and the ratio of the two amounts."""
    from vpit.mixtures.spec import parse_count

    vals = [r for r in rows if isinstance(r.get(metric), (int, float))]
    try:
        amounts = sorted({parse_count(r[axis], axis) for r in vals})
    except ValueError:
        return None
    if len(amounts) < 2:
        return None
    lo, hi = amounts[0], amounts[-1]
    others = [a for a in axes if a != axis]
    key = lambda r: (tuple(str(r[a]) for a in others), r.get("seed"))  # noqa: E731
    low = {key(r): r[metric] for r in vals if parse_count(r[axis], axis) == lo}
    diffs = [r[metric] - low[key(r)] for r in vals if parse_count(r[axis], axis) == hi and key(r) in low]
    if not diffs:
        return None
    d = np.asarray(diffs, dtype=float)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "se": se, "pairs": len(d), "ratio": hi / lo, "from": lo, "to": hi}


def findings(rows: list[dict[str, Any]], axes: list[str]) -> list[str]:
    """Sentences computed from the results: each count axis's effect on the understanding and generation
    metrics that vary across the grid, and the asymmetry between understanding data's effect on
    generation and generation data's on understanding (on the key metrics, signed so that + helps)."""
    und, gen = key_metrics(rows)
    metrics = [m for m in (*UNDERSTANDING_KEYS, *GENERATION_KEYS) if _varies(rows, m)]
    out, per_doubling = [], {}
    for i, axis in enumerate(axes[:2]):
        for metric in metrics:
            e = _paired_effect(rows, axes, axis, metric)
            if e is None:
                continue
            noise = "" if np.isnan(e["se"]) else f" ± {e['se']:.3f}"
            beyond = np.isnan(e["se"]) or abs(e["mean"]) > 2 * e["se"]
            verdict = "beyond 2 standard errors" if beyond and e["mean"] != 0 else "within noise"
            better = " (lower is better)" if _lower_is_better(metric) else ""
            out.append(
                f"{e['ratio']:.3g}× {_role(axis, i)} data ({e['from']:,} -> {e['to']:,}, `{axis}`) changed "
                f"{_short(metric)}{better} by {e['mean']:+.3f}{noise} ({e['pairs']} paired runs; {verdict})."
            )
            sign = -1 if _lower_is_better(metric) else 1
            per_doubling[(_role(axis, i), metric)] = sign * e["mean"] / np.log2(e["ratio"])
    a, b = per_doubling.get(("understanding", gen)), per_doubling.get(("generation", und))
    if a is not None and b is not None:
        relation = "more than" if a > b else "less than" if a < b else "as much as"
        out.append(
            f"Asymmetry: understanding data improved {_short(gen)} by {a:+.3f} per doubling, generation data "
            f"improved {_short(und)} by {b:+.3f} per doubling: here understanding data helped generation "
            f"{relation} generation data helped understanding (MetaMorph reports more)."
        )
    return out


def _laws_section(
    out: Path,
    rows: list[dict[str, Any]],
    axes: list[str],
    files: dict[str, Path],
    law_metrics: tuple[str, str] | None,
    optimum: dict[str, Any] | None,
) -> list[str]:
    """Fit the laws, write laws.json and pareto.png, return the report's markdown lines."""
    from vpit.grid import law as L

    und, gen = law_metrics or key_metrics(rows)
    if not (und and gen) or len(axes) != 2:
        return []
    laws, errors = {}, {}
    for metric in (und, gen):
        try:
            laws[metric] = L.fit_law(rows, axes, metric)
            errors[metric] = L.loo_error(rows, axes, metric)
        except (ValueError, np.linalg.LinAlgError) as e:
            return ["## Mixing law", "", f"not fitted: {e}", ""]
    md = ["## Mixing law", "", "Fitted across every cell and seed; error by leave-one-cell-out.", ""]
    md += ["| metric | law | LOO RMSE | LOO MAE | seed sd |", "|---|---|---|---|---|"]
    for metric, lw in laws.items():
        e = errors[metric]
        md.append(f"| {metric} | `{lw.describe()}` | {e['rmse']:.4f} | {e['mae']:.4f} | {e['seed_sd']:.4f} |")
    budget = (optimum or {}).get("budget") or int(max(sum(L.axis_counts([r[a] for a in axes], "axes")) for r in rows))
    weight = (optimum or {}).get("weight", 0.5)
    best = L.optimum((laws[und], laws[gen]), budget, weight)
    front = L.pareto((laws[und], laws[gen]), budget)
    measured = (optimum or {}).get("measured")
    files["pareto"] = out / "pareto.png"
    _pareto_plot(files["pareto"], rows, axes, und, gen, front, best, measured)
    summary = {
        "laws": {
            m: {"coef": lw.coef, "axes": lw.axes, "describe": lw.describe(), **errors[m]} for m, lw in laws.items()
        },
        "optimum": {**dataclasses.asdict(best), "measured": measured},
    }
    files["laws"] = out / "laws.json"
    files["laws"].write_text(json.dumps(summary, indent=1), encoding="utf-8")
    md += [
        "",
        f"Best split of {budget:,} samples for {best.objective}: "
        + ", ".join(f"`{a}` = {n:,}" for a, n in best.counts.items())
        + "; predicted "
        + ", ".join(f"{_short(m)} {v:.3f}" for m, v in best.predicted.items())
        + ".",
    ]
    if measured:
        md.append(
            "Measured there (`vpit grid run --optimum`, mean of its seeds): "
            + ", ".join(
                f"{_short(m)} {measured[m]:.3f} (predicted {best.predicted[m]:.3f})"
                for m in best.predicted
                if m in measured
            )
            + "."
        )
    md += ["", "![pareto](pareto.png)", ""]
    return md


def _pareto_plot(path, rows, axes, und, gen, front, best, measured) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells: dict[tuple, list] = {}
    for r in rows:
        if isinstance(r.get(und), (int, float)) and isinstance(r.get(gen), (int, float)):
            cells.setdefault(tuple(str(r[a]) for a in axes), []).append((r[und], r[gen]))
    pts = {c: np.asarray(v, float) for c, v in cells.items()}
    means = {c: v.mean(axis=0) for c, v in pts.items()}
    dominated = {
        c for c, m in means.items() if any((o >= m).all() and (o > m).any() for d, o in means.items() if d != c)
    }
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ax.plot([p[und] for p in front], [p[gen] for p in front], "-", color="gray", label="law, every split of the budget")
    for c, v in pts.items():
        m = means[c]
        sd = v.std(axis=0, ddof=1) if len(v) > 1 else np.zeros(2)
        color = "tab:blue" if c not in dominated else "tab:gray"
        ax.errorbar(m[0], m[1], xerr=sd[0], yerr=sd[1], fmt="o", color=color, capsize=2)
        ax.annotate("×".join(c), m, fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.plot([best.predicted[und]], [best.predicted[gen]], "*", color="tab:red", ms=14, label="predicted optimum")
    if measured and und in measured and gen in measured:
        ax.plot([measured[und]], [measured[gen]], "s", color="tab:red", mfc="none", ms=10, label="measured optimum")
    ax.set_xlabel(und)
    ax.set_ylabel(gen)
    ax.set_title("cells (mean ± sd over seeds; blue: on the Pareto front)", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    out: Path,
    rows: list[dict[str, Any]],
    axes: list[str],
    axis_values: dict[str, list[Any]],
    failed: list[dict[str, Any]] | None = None,
    *,
    optimum: dict[str, Any] | None = None,
    law_metrics: tuple[str, str] | None = None,
) -> dict[str, Path]:
    """Write results.csv/.parquet, heatmap_*.png (+ heatmaps.json with spreads), findings, the mixing
    law (laws.json, pareto.png; with two count axes), correlation.png and report.md into `out`.
    `optimum`: {"budget", "weight", "measured": {metric: value}} for the optimum's section."""
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
    found = findings(rows, axes)
    if found:
        md += ["## Findings", "", *[f"- {line}" for line in found], ""]
    heatmaps["spread"] = {}
    for metric in metrics:
        grid = np.full((len(labels[0]), len(labels[1])), np.nan)
        spread = np.full_like(grid, np.nan)
        for i, vi in enumerate(labels[0]):
            for j, vj in enumerate(labels[1]):
                sel = table[axes[0]].astype(str) == vi
                if len(axes) > 1:
                    sel &= table[axes[1]].astype(str) == vj
                vals = table.loc[sel, metric].dropna() if metric in table else []
                if len(vals):
                    grid[i, j] = float(np.mean(vals))
                if len(vals) > 1:
                    spread[i, j] = float(np.std(vals, ddof=1))
        path = out / f"heatmap_{_slug(metric)}.png"
        _heatmap(path, metric, axes, labels, grid, spread)
        files[f"heatmap:{metric}"] = path
        heatmaps["metrics"][metric] = [[None if np.isnan(v) else float(v) for v in row] for row in grid]
        heatmaps["spread"][metric] = [[None if np.isnan(v) else float(v) for v in row] for row in spread]
        md += [f"## {metric}", "", f"![{metric}]({path.name})", ""]
    files["heatmaps"] = out / "heatmaps.json"  # the numbers behind every heatmap, for re-plotting
    files["heatmaps"].write_text(json.dumps(heatmaps, indent=1), encoding="utf-8")
    if optimum is not None or law_metrics is not None:
        md += _laws_section(out, rows, axes, files, law_metrics, optimum)
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
