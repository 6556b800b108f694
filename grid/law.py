"""A mixing law fitted across a grid's cells, its error, its Pareto front and its optimum.

Per metric, the law is log-linear in each axis's count:

    metric = a + sum_i b_i * ln(count_i)

fitted by least squares over every cell and seed (the seeds are repeats, so they weigh each
cell by its number of runs). Its error is measured by leave-one-cell-out: each cell (all its
seeds) is predicted by the law fitted without it, and the RMSE of those predictions against
the cell's measured mean is reported beside the spread between seeds, which bounds what any
law can do.

With two count axes (understanding and generation), `optimum` searches the split of a total
sample budget that maximises a weighted mean of an understanding metric and a generation
metric under their laws, and `pareto` traces the laws' predicted pair of metrics along every
split: the front a user trades along. Nothing here is fitted in advance or special-cased: the
numbers come from the grid's results. olmix and RegMix fit such laws for text-only mixtures.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from vpit.errors import ConfigError
from vpit.mixtures.spec import parse_count

__all__ = ["Law", "Optimum", "fit_law", "loo_error", "optimum", "pareto", "axis_counts"]


def axis_counts(values: list[Any], axis: str) -> list[int]:
    """An axis's values as counts (200k -> 200000); refuses non-count axes by name."""
    try:
        return [parse_count(v, f"axes.{axis}") for v in values]
    except ValueError as e:
        raise ConfigError(f"a mixing law needs count axes: {e}") from None


@dataclasses.dataclass(frozen=True)
class Law:
    metric: str
    axes: tuple[str, ...]
    coef: tuple[float, ...]
    """(a, b_1, ..., b_k): intercept, then one slope per axis, per unit of ln(count)."""

    def predict(self, counts: np.ndarray | list[float]) -> np.ndarray:
        x = np.log(np.atleast_2d(np.asarray(counts, dtype=float)))
        return self.coef[0] + x @ np.asarray(self.coef[1:])

    def describe(self) -> str:
        terms = " ".join(
            f"{'+' if b >= 0 else '-'} {abs(b):.4f} ln({a.split('.')[-2] if '.' in a else a})"
            for a, b in zip(self.axes, self.coef[1:])
        )
        return f"{self.metric} = {self.coef[0]:.4f} {terms}"


def _design(rows: list[dict[str, Any]], axes: list[str], metric: str) -> tuple[np.ndarray, np.ndarray, list[tuple]]:
    keep = [r for r in rows if isinstance(r.get(metric), (int, float)) and not math.isnan(r[metric])]
    x = np.array([[parse_count(r[a], a) for a in axes] for r in keep], dtype=float)
    y = np.array([float(r[metric]) for r in keep])
    cells = [tuple(str(r[a]) for a in axes) for r in keep]
    return x, y, cells


def _lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    design = np.hstack([np.ones((len(x), 1)), np.log(x)])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return coef


def fit_law(rows: list[dict[str, Any]], axes: list[str], metric: str) -> Law:
    x, y, _ = _design(rows, axes, metric)
    if len(x) < len(axes) + 1:
        raise ConfigError(f"{metric}: {len(x)} results are too few to fit a law over {len(axes)} axes")
    return Law(metric=metric, axes=tuple(axes), coef=tuple(float(c) for c in _lstsq(x, y)))


def loo_error(rows: list[dict[str, Any]], axes: list[str], metric: str) -> dict[str, float]:
    """Leave-one-cell-out: {"rmse", "mae"} of each cell's predicted vs measured mean, and
    "seed_sd", the mean spread between a cell's seeds (the noise floor)."""
    x, y, cells = _design(rows, axes, metric)
    errors, sds = [], []
    for cell in sorted(set(cells)):
        held = np.array([c == cell for c in cells])
        if (~held).sum() < len(axes) + 1 or len({c for c, h in zip(cells, held) if not h}) < len(axes) + 1:
            continue
        coef = _lstsq(x[~held], y[~held])
        pred = coef[0] + np.log(x[held][0]) @ coef[1:]
        errors.append(float(pred - y[held].mean()))
        if held.sum() > 1:
            sds.append(float(y[held].std(ddof=1)))
    if not errors:
        raise ConfigError(f"{metric}: too few cells for a leave-one-cell-out error")
    e = np.asarray(errors)
    return {
        "rmse": float(np.sqrt(np.mean(e**2))),
        "mae": float(np.mean(np.abs(e))),
        "seed_sd": float(np.mean(sds)) if sds else float("nan"),
        "cells": len(errors),
    }


@dataclasses.dataclass(frozen=True)
class Optimum:
    budget: int
    counts: dict[str, int]
    """Axis -> count of the predicted best split."""
    predicted: dict[str, float]
    """Metric -> the laws' prediction at that split."""
    objective: str


Bounds = tuple[tuple[float, float], tuple[float, float]]


def _splits(budget: int, bounds: Bounds | None = None) -> np.ndarray:
    """Splits (n_1, n_2) of `budget`, each count within its bounds (the range the grid measured:
    a law is not to be trusted far outside it); empty when no split fits."""
    (lo1, hi1), (lo2, hi2) = bounds or ((1, budget - 1), (1, budget - 1))
    lo, hi = max(lo1, budget - hi2), min(hi1, budget - lo2)
    if lo > hi:
        return np.zeros((0, 2))
    first = np.unique(np.round(np.linspace(lo, hi, 197)))
    return np.stack([first, budget - first], axis=1)


def pareto(laws: tuple[Law, Law], budget: int, bounds: Bounds | None = None) -> list[dict[str, float]]:
    """The laws' predicted (metric_1, metric_2) along every split of `budget` between the two axes,
    with the first axis's share: the trade-off a fixed budget allows."""
    splits = _splits(budget, bounds)
    first, second = laws[0].predict(splits), laws[1].predict(splits)
    return [
        {"share": float(s[0] / budget), laws[0].metric: float(a), laws[1].metric: float(b)}
        for s, a, b in zip(splits, first, second)
    ]


def optimum(laws: tuple[Law, Law], budget: int, weight: float = 0.5, bounds: Bounds | None = None) -> Optimum:
    """The split of `budget` between the laws' two axes that maximises
    weight * metric_1 + (1 - weight) * metric_2, both predicted by their laws; with `bounds`, each
    axis's count stays in its (low, high) range."""
    if laws[0].axes != laws[1].axes or len(laws[0].axes) != 2:
        raise ConfigError("an optimum needs two laws over the same two count axes")
    if not 0 <= weight <= 1:
        raise ConfigError(f"optimum.weight: expected a number in [0, 1], got {weight}")
    splits = _splits(budget, bounds)
    if not len(splits):
        raise ConfigError(
            f"optimum.budget: no split of {budget:,} keeps "
            + " and ".join(f"{a} within [{lo:,.0f}, {hi:,.0f}]" for a, (lo, hi) in zip(laws[0].axes, bounds))
            + " (the range the grid measured); choose a budget between "
            f"{bounds[0][0] + bounds[1][0]:,.0f} and {bounds[0][1] + bounds[1][1]:,.0f}"
        )
    score = weight * laws[0].predict(splits) + (1 - weight) * laws[1].predict(splits)
    best = splits[int(np.argmax(score))]
    counts = [int(round(best[0])), budget - int(round(best[0]))]
    return Optimum(
        budget=budget,
        counts=dict(zip(laws[0].axes, counts)),
        predicted={law.metric: float(law.predict(counts)[0]) for law in laws},
        objective=f"{weight:g} x {laws[0].metric} + {1 - weight:g} x {laws[1].metric}",
    )
