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
    # 10% of each source held out, grouped by image: 80% of understanding's training split, all of editing's
    assert plan.spec.heldout == 0.1 and plan.spec.heldout_by == "image"
    available = {s.name: s.available for s in plan.sources}
    # 16-pixel scenes repeat: one vqa and one edit sample share an image with a held-out sample
    assert available == {"shapes_vqa": 37, "shapes_chat": 7, "edits": 5}
    assert plan.counts == {"shapes_vqa": 29, "shapes_chat": 5, "edits": 5}  # 29 + 5 = 34, split 37:7
    assert "held out by image" in out and "training samples sharing a held-out image: 0" in out
    assert make_plan(load_spec(write_demo_spec(tmp_path, heldout=0))).counts == {
        "shapes_vqa": 32,
        "shapes_chat": 8,
        "edits": 7,
    }  # without the split: 80% of 40 + 10, all 7 edits
    assert plan.spec.cache is None and f"plan hash {plan.hash}" in out
    assert "realised batches match the plan's schedule" in out
    assert (tmp_path / "mixtures" / "demo.ratio.png").stat().st_size > 1000
