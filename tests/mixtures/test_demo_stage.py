"""The demo's mixture stage: a spec generated over the demo datasets that exist, planned."""

from __future__ import annotations

from mixtures import load_spec, make_plan
from mixtures.demo import mixture_stage
from tests.mixtures.helpers import make_dataset


def test_demo_stage_writes_a_feasible_spec_over_present_datasets(tmp_path, capsys):
    make_dataset(tmp_path / "datasets" / "understanding", "u", [["understanding"] * 30, ["understanding", "text"] * 10])
    make_dataset(tmp_path / "datasets" / "editing", "e", [["editing"] * 7])
    spec = mixture_stage(tmp_path, batch_size=8, steps=3)
    out = capsys.readouterr().out
    plan = make_plan(load_spec(spec))
    assert plan.counts == {"shapes_vqa": 32, "shapes_chat": 8, "edits": 7}  # 80% of understanding, all edits
    assert plan.spec.cache is None and f"plan hash {plan.hash}" in out
    assert "realised batches match the plan's schedule" in out
    assert (tmp_path / "mixtures" / "demo.ratio.png").stat().st_size > 1000
