"""The demo's mixture stage: a spec generated over the demo datasets that exist, planned."""

from __future__ import annotations

from tests.mixtures.helpers import make_dataset
from vpit.demo.mixture_stage import mixture_stage, write_demo_spec
from vpit.mixtures import load_spec, make_plan


def test_demo_stage_writes_a_feasible_spec_over_present_datasets(tmp_path, capsys):
    make_dataset(tmp_path / "datasets" / "understanding", "u", [["understanding"] * 30, ["understanding", "text"] * 10])
    make_dataset(tmp_path / "datasets" / "editing", "e", [["editing"] * 7])
    spec = mixture_stage(tmp_path, batch_size=8, steps=3)
    out = capsys.readouterr().out
    plan = make_plan(load_spec(spec))
    # 10% of each source held out by id hash: 80% of understanding's training split, all of editing's
    assert plan.spec.heldout == 0.1
    available = {s.name: s.available for s in plan.sources}
    assert available == {"shapes_vqa": 38, "shapes_chat": 7, "edits": 6}
    assert plan.counts == {"shapes_vqa": 30, "shapes_chat": 5, "edits": 6}  # 30 + 5 = 35, split 38:7
    assert make_plan(load_spec(write_demo_spec(tmp_path, heldout=0))).counts == {
        "shapes_vqa": 32,
        "shapes_chat": 8,
        "edits": 7,
    }  # without the split: 80% of 40 + 10, all 7 edits
    assert plan.spec.cache is None and f"plan hash {plan.hash}" in out
    assert "realised batches match the plan's schedule" in out
    assert (tmp_path / "mixtures" / "demo.ratio.png").stat().st_size > 1000
