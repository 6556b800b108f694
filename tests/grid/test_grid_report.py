"""The grid report: table, heatmaps with the right axes and cell values, correlation plot."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from PIL import Image

from vpit.grid.report import write_report


def test_report_from_a_2x2_grid_with_two_seeds(tmp_path):
    axes = ["groups.understanding.count", "groups.generation.count"]
    values = {axes[0]: ["100", "200"], axes[1]: ["50", "150"]}
    rows = []
    for i, u in enumerate(values[axes[0]]):
        for j, g in enumerate(values[axes[1]]):
            for seed in (0, 1):
                rows.append(
                    {
                        "cell": f"c{i}{j}",
                        "seed": seed,
                        axes[0]: u,
                        axes[1]: g,
                        "understanding/exact_match": 0.1 * (i + 1) + 0.01 * seed,
                        "generation/cosine": 0.2 * (j + 1) + 0.1 * i,
                        "generation/frechet": 5.0 - j,
                    }
                )
    files = write_report(tmp_path, rows, axes, values)

    table = pd.read_parquet(files["parquet"])
    assert len(table) == 8 and set(table["seed"]) == {0, 1}
    assert pd.read_csv(files["csv"]).shape == (8, 7)
    heat = json.loads(files["heatmaps"].read_text())
    assert heat["rows"] == {"axis": axes[0], "values": ["100", "200"]}
    assert heat["columns"] == {"axis": axes[1], "values": ["50", "150"]}
    # seed-averaged cell values
    assert np.allclose(heat["metrics"]["understanding/exact_match"], [[0.105, 0.105], [0.205, 0.205]])
    assert np.allclose(heat["metrics"]["generation/cosine"], [[0.2, 0.4], [0.3, 0.5]])
    for metric in ("understanding/exact_match", "generation/cosine", "generation/frechet"):
        png = files[f"heatmap:{metric}"]
        assert Image.open(png).size[0] > 200
    assert Image.open(files["correlation"]).size[0] > 300
    md = files["markdown"].read_text()
    assert "![generation/cosine](heatmap_generation_cosine.png)" in md and "![correlation](correlation.png)" in md
    assert md.count("\n| 100 |") + md.count("\n| 200 |") == 8
