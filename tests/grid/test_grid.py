"""`vpit grid`: a 2x2 grid of tiny runs on local Ray, killed midway and re-run.

One grid serves both must-shows: the kill happens once the first cell has finished, the
re-run must leave finished cells untouched and complete the rest, and the report must show
the right axes and every cell's metrics.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.train.conftest import ROOT
from vpit.common import subprocess_env, vpit_argv
from vpit.grid.spec import expand, load_grid

AXES = {"groups.understanding.count": [40, 80], "groups.generation.count": [24, 48]}


def _write_grid(root: Path, train_mixture: dict, bpe_tokenizer: str, axes=AXES, max_steps: int = 6) -> Path:
    (root / "base.yaml").write_text(f"include: {train_mixture['spec']}\nheldout: 0.35\n")
    (root / "train.yaml").write_text(f"""
output_dir: unused
model: {{llm: tiny, tokenizer: {bpe_tokenizer}, chat_template: chatml, vision_dim: {train_mixture["d"]},
         num_visual_tokens: {train_mixture["m"]}, hidden_size: 32, num_heads: 2, intermediate_size: 64, num_layers: 1}}
data: {{mixture: base.yaml, max_len: 256, num_workers: 0}}
micro_batch_size: 8
max_steps: {max_steps}
lr: 1e-3
lr_reference_batch: 8
save_every: 2
""")
    (root / "grid.yaml").write_text(
        json.dumps(
            {
                "name": "tiny",
                "base": "base.yaml",
                "train": "train.yaml",
                "axes": axes,
                "seeds": [0],
                "eval": {"suite": ["understanding", "generation"], "every_steps": 3},
                "resources": {"num_cpus": 1},
            }
        )
    )
    return root / "grid.yaml"


def _vpit(args, **kw):
    return vpit_argv(*args), subprocess_env(OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def grid_after_kill(tmp_path_factory, train_mixture, bpe_tokenizer) -> dict:
    root = tmp_path_factory.mktemp("grid")
    grid = _write_grid(root, train_mixture, bpe_tokenizer)
    cells = [c.id for c in expand(load_grid(grid))]
    out = root / "tiny-grid"
    cmd, env = _vpit(["grid", "run", str(grid)])
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if any((out / "cells" / c / "result.json").exists() for c in cells):
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, Ray, and the trainers it launched
    proc.wait()
    # A Ray worker that was writing its result when the driver died may still finish it:
    # take the snapshot once the set of results has been stable for a few seconds.
    done = lambda: sorted(c for c in cells if (out / "cells" / c / "result.json").exists())  # noqa: E731
    seen, stable_since = done(), time.time()
    while time.time() - stable_since < 4:
        time.sleep(0.5)
        if done() != seen:
            seen, stable_since = done(), time.time()
    finished = {c: (out / "cells" / c / "result.json").read_bytes() for c in seen}
    ckpts = {
        c: {
            str(p.relative_to(out)): p.read_bytes()
            for p in (out / "cells" / c / "run" / "checkpoints").rglob("*")
            if p.is_file()
        }
        for c in finished
    }
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return {"out": out, "cells": cells, "finished": finished, "ckpts": ckpts, "rerun": rerun}


def test_killed_grid_reruns_only_unfinished_cells(grid_after_kill):
    g = grid_after_kill
    assert g["rerun"].returncode == 0, g["rerun"].stderr[-3000:]
    assert 1 <= len(g["finished"]) < 4, "the grid must be killed midway for this test to mean anything"
    assert f"{4 - len(g['finished'])} run now, {len(g['finished'])} already finished, 0 failed" in g["rerun"].stdout
    out = g["out"]
    for cell, result in g["finished"].items():  # untouched: same metrics, same checkpoint bytes
        assert (out / "cells" / cell / "result.json").read_bytes() == result
        now = {
            str(p.relative_to(out)): p.read_bytes()
            for p in (out / "cells" / cell / "run" / "checkpoints").rglob("*")
            if p.is_file()
        }
        assert now == g["ckpts"][cell]
    for cell in g["cells"]:
        result = json.loads((out / "cells" / cell / "result.json").read_text())
        assert result["cell"] == cell
        metrics = [
            json.loads(line) for line in (out / "cells" / cell / "run" / "metrics.jsonl").read_text().splitlines()
        ]
        assert [m["step"] for m in metrics] == list(range(1, 7))  # a resumed cell has each step exactly once


def test_grid_report_has_the_axes_and_every_cells_metrics(grid_after_kill):
    import pandas as pd

    out = grid_after_kill["out"]
    table = pd.read_csv(out / "report" / "results.csv")
    assert len(table) == 4
    assert sorted(zip(table["groups.understanding.count"], table["groups.generation.count"])) == [
        (40, 24),
        (40, 48),
        (80, 24),
        (80, 48),
    ]
    for col in ("understanding/exact_match", "generation/cosine", "generation/retrieval", "generation/frechet"):
        assert table[col].notna().all(), col
    assert ((table["generation/cosine"] >= -1) & (table["generation/cosine"] <= 1)).all()
    heat = json.loads((out / "report" / "heatmaps.json").read_text())
    assert heat["rows"] == {"axis": "groups.understanding.count", "values": ["40", "80"]}
    assert heat["columns"] == {"axis": "groups.generation.count", "values": ["24", "48"]}
    for _, row in table.iterrows():  # each heatmap cell is that cell's metric
        i = ["40", "80"].index(str(row["groups.understanding.count"]))
        j = ["24", "48"].index(str(row["groups.generation.count"]))
        assert heat["metrics"]["generation/cosine"][i][j] == pytest.approx(row["generation/cosine"])
    for name in (
        "heatmap_generation_cosine.png",
        "heatmap_understanding_exact_match.png",
        "correlation.png",
        "report.md",
    ):
        assert (out / "report" / name).stat().st_size > 500
    for cell in grid_after_kill["cells"]:  # during training every 3 steps (eval.every_steps), and at the end
        evals = sorted(p.name for p in (out / "cells" / cell / "run" / "eval").glob("step-*.json"))
        assert evals == ["step-000003.json", "step-000006.json"]


def test_grid_plan_rejects_an_infeasible_cell_and_a_failed_cell_does_not_stop_others(
    tmp_path, train_mixture, bpe_tokenizer
):
    from vpit.grid.commands import plan_grid

    bad = _write_grid(tmp_path, train_mixture, bpe_tokenizer, axes={"groups.generation.count": [24, "nonsense"]})
    with pytest.raises(ValueError, match=r"1 infeasible cell\(s\) in tiny:\n  c01_generation.count=nonsense_s0"):
        plan_grid(load_grid(bad))
    # 4 + 120 samples make 15 batches of 8: too few for 18 steps, so that cell's trainer fails
    grid = _write_grid(
        tmp_path, train_mixture, bpe_tokenizer, axes={"groups.understanding.count": [4, 40]}, max_steps=18
    )
    cmd, env = _vpit(["grid", "run", str(grid)])
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "1 run now, 0 already finished, 1 failed" in res.stdout
    assert "FAILED c00_understanding.count=4_s0" in res.stdout and "max_steps" in res.stdout
    assert (tmp_path / "tiny-grid" / "cells" / "c01_understanding.count=40_s0" / "result.json").is_file()


def test_grid_plan_prints_every_cell_id_and_value_whole(tmp_path, train_mixture, bpe_tokenizer):
    """Columns are as wide as their widest value: no id or count is cut (147 once printed as 14)."""
    from vpit.grid.commands import plan_grid

    axes = {"groups.understanding.count": [40, 120], "groups.generation.count": [24, 100]}
    spec = load_grid(_write_grid(tmp_path, train_mixture, bpe_tokenizer, axes=axes))
    lines = plan_grid(spec).splitlines()
    assert lines[0].split() == [
        "cell",
        "groups.understanding.count",
        "groups.generation.count",
        "total",
        "plan",
        "hash",
    ]
    rows = [line.split() for line in lines[2:]]
    assert [r[0] for r in rows] == [c.id for c in expand(spec)]
    assert [(int(r[1]), int(r[2]), int(r[3])) for r in rows] == [(u, g, u + g) for u in (40, 120) for g in (24, 100)]


def test_a_grid_sweeps_one_phase_of_a_mixture(tmp_path, train_mixture, bpe_tokenizer):
    """An axis may address one phase by name: only that phase's amount changes from cell to cell."""
    from vpit.grid.commands import plan_grid
    from vpit.mixtures import load_spec, make_plan

    axes = {"phases.joint.groups.generation.count": [20, 60]}
    spec = load_grid(_write_grid(tmp_path, train_mixture, bpe_tokenizer, axes=axes))
    (tmp_path / "base.yaml").write_text(
        f"include: {train_mixture['spec']}\ngroups: null\nphases:\n"
        "  - {name: align, groups: {understanding: 30}}\n"
        "  - {name: joint, groups: {understanding: 50, generation: 40}}\n"
    )
    rows = [line.split() for line in plan_grid(spec).splitlines()[2:]]
    assert [(int(r[1]), int(r[2])) for r in rows] == [(20, 100), (60, 140)]
    plans = [make_plan(load_spec(spec.base, cell.overrides)) for cell in expand(spec)]
    assert [dict(p.phases[1].groups)["generation"] for p in plans] == [20, 60]
    assert plans[0].phases[0] == plans[1].phases[0]
