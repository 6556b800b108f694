"""The mixing law, its leave-one-cell-out error, its optimum and the findings in words, on grids
whose truth is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vpit.grid import law as L
from vpit.grid.report import findings, write_report

U, G = "groups.understanding.count", "groups.generation.count"
UND, GEN = "understanding/exact_match", "generation/judge/colour_at_position"


def _rows(f_und, f_gen, noise=0.0, seeds=(0, 1), values=(("1k", "4k", "16k"), ("500", "2k", "8k"))):
    rng = np.random.default_rng(0)
    rows = []
    for u in values[0]:
        for g in values[1]:
            for s in seeds:
                nu, ng = L.axis_counts([u], U)[0], L.axis_counts([g], G)[0]
                rows.append(
                    {
                        U: u,
                        G: g,
                        "seed": s,
                        UND: f_und(nu, ng) + noise * rng.standard_normal(),
                        GEN: f_gen(nu, ng) + noise * rng.standard_normal(),
                    }
                )
    return rows


def test_the_law_recovers_a_log_linear_truth_and_loo_error_is_near_zero():
    rows = _rows(lambda u, g: 0.1 + 0.05 * math.log(u), lambda u, g: 0.02 * math.log(u) + 0.04 * math.log(g))
    law = L.fit_law(rows, [U, G], GEN)
    assert law.coef == pytest.approx((0.0, 0.02, 0.04), abs=1e-9)
    err = L.loo_error(rows, [U, G], GEN)
    assert err["rmse"] < 1e-9 and err["cells"] == 9 and err["seed_sd"] == pytest.approx(0.0)


def test_loo_error_sees_what_a_log_linear_law_cannot_fit():
    rows = _rows(lambda u, g: 0.5, lambda u, g: 0.5 + (0.3 if (u, g) == (4000, 2000) else 0.0))
    assert L.loo_error(rows, [U, G], GEN)["rmse"] > 0.05  # the bump in the middle cell is not a log-linear effect


def test_the_optimum_is_the_closed_form_split_of_the_budget():
    # w * und + (1 - w) * gen = 0.05 ln u + 0.04 ln g (w = 0.5 of 0.1 ln u, 0.08 ln g): best u share = 0.1/0.18
    rows = _rows(lambda u, g: 0.1 * math.log(u), lambda u, g: 0.08 * math.log(g))
    laws = (L.fit_law(rows, [U, G], UND), L.fit_law(rows, [U, G], GEN))
    best = L.optimum(laws, 90_000, weight=0.5)
    assert best.counts[U] == pytest.approx(90_000 * 0.1 / 0.18, rel=0.01)
    assert best.counts[U] + best.counts[G] == 90_000
    assert best.predicted[UND] == pytest.approx(0.1 * math.log(best.counts[U]), abs=1e-6)
    front = L.pareto(laws, 90_000)
    und = [p[UND] for p in front]
    assert und == sorted(und)  # more of the budget to understanding: better understanding, worse generation
    with pytest.raises(ValueError, match="weight"):
        L.optimum(laws, 90_000, weight=1.5)


def test_findings_are_computed_from_the_numbers_with_their_error():
    rows = _rows(lambda u, g: 0.3, lambda u, g: 0.2 + 0.05 * math.log2(u / 1000), noise=0.01)
    lines = findings(rows, [U, G])
    gen_by_und = next(line for line in lines if line.startswith("16× understanding") and "colour at position" in line)
    # 16x understanding data = 4 doublings x 0.05: +0.200, far beyond its standard error
    assert "changed colour at position by +0.2" in gen_by_und and "beyond 2 standard errors" in gen_by_und
    und_by_gen = next(line for line in lines if line.startswith("16× generation") and "exact match" in line)
    assert "within noise" in und_by_gen
    asym = next(line for line in lines if line.startswith("Asymmetry"))
    assert "by +0.050 per doubling" in asym and "helped generation more than" in asym


def test_the_report_draws_spread_laws_pareto_and_the_optimum(tmp_path):
    rows = _rows(lambda u, g: 0.1 * math.log(u), lambda u, g: 0.08 * math.log(g), noise=0.02)
    values = {U: ["1k", "4k", "16k"], G: ["500", "2k", "8k"]}
    files = write_report(
        tmp_path, rows, [U, G], values, optimum={"budget": 20_000, "weight": 0.5, "measured": {UND: 0.9, GEN: 0.7}}
    )
    for key in ("pareto", "laws", "markdown", f"heatmap:{GEN}"):
        assert files[key].is_file()
    md = files["markdown"].read_text()
    assert "## Findings" in md and "## Mixing law" in md and "LOO RMSE" in md
    assert "Measured there" in md and "predicted" in md
    import json

    heat = json.loads(files["heatmaps"].read_text())
    assert heat["spread"][GEN][0][0] is not None  # two seeds per cell: a spread


def test_the_optimum_stays_within_the_range_the_grid_measured():
    rows = _rows(lambda u, g: 0.1 * math.log(u), lambda u, g: 0.001 * math.log(g))  # generation barely matters
    laws = (L.fit_law(rows, [U, G], UND), L.fit_law(rows, [U, G], GEN))
    free = L.optimum(laws, 20_000, weight=0.5)
    assert free.counts[U] > 16_000  # unbounded, the law would spend nearly all on understanding
    bounded = L.optimum(laws, 20_000, weight=0.5, bounds=((1000, 16_000), (500, 8000)))
    assert bounded.counts == {U: 16_000, G: 4000}  # as much understanding as the grid measured
    with pytest.raises(ValueError, match="choose a budget between 1,500 and 24,000"):
        L.optimum(laws, 30_000, bounds=((1000, 16_000), (500, 8000)))
