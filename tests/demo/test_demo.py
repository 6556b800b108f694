"""`vpit demo`, shortened: every stage runs, in order, and the report shows what each produced."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vpit.demo.corpora import BAD_LLAVA_CASES
from vpit.demo.run import STAGES, DemoConfig, run_demo
from vpit.mixtures import heldout_items, load_spec
from vpit.model.encoder import load_encoder


def test_every_stage_ran_in_order_and_the_summary_times_each(quick_demo):
    names = [name for name, _ in STAGES]
    assert list(quick_demo["seconds"]) == names
    headers = re.findall(r"^\[(\d)/9\] ", quick_demo["stdout"], flags=re.M)
    assert headers == [str(i) for i in range(1, 10)]
    summary = quick_demo["stdout"].split("demo summary", 1)[1]
    for i, name in enumerate(names, 1):
        assert re.search(rf"^  {i} {re.escape(name)}\s+\d+  \S", summary, flags=re.M), name
    saved = json.loads((quick_demo["out"] / "demo.json").read_text())
    assert saved["config"]["train_steps"] == quick_demo["config"].train_steps
    printed = dict(re.findall(r"^  \d (\S+(?: images)?)\s+(\d+)  ", summary, flags=re.M))
    assert {k: int(v) for k, v in printed.items()} == {k: round(v) for k, v in saved["seconds"].items()}


def test_ingest_counts_and_quarantine_reasons_of_every_kind(quick_demo):
    cfg, ingest = quick_demo["config"], quick_demo["facts"]["ingest"]
    assert set(ingest) == {"understanding", "generation", "video", "videoqa", "editing"}
    assert ingest["understanding"]["samples"] == cfg.samples
    assert sum(ingest["understanding"]["quarantined"].values()) == len(BAD_LLAVA_CASES)
    assert ingest["generation"]["samples"] == cfg.pairs and sum(ingest["generation"]["quarantined"].values()) == 5
    assert ingest["generation"]["quarantined"]["download_disallowed"] == 1  # the noai header was honoured
    assert ingest["video"]["samples"] == 2 * cfg.clips and sum(ingest["video"]["quarantined"].values()) == 4
    assert ingest["videoqa"]["samples"] == cfg.clips
    assert ingest["editing"]["samples"] == cfg.edits and sum(ingest["editing"]["quarantined"].values()) == 3
    for d in ingest.values():  # the quarantine file holds one line per counted record
        lines = (
            (Path(d["path"]) / "quarantine.jsonl").read_text().splitlines() if sum(d["quarantined"].values()) else []
        )
        assert len(lines) == sum(d["quarantined"].values())


def test_precompute_mixture_train_and_evaluate(quick_demo):
    facts, out = quick_demo["facts"], quick_demo["out"]
    pre = facts["precompute"]
    assert set(pre["datasets"]) == set(facts["ingest"]) and pre["m"] == 16  # the demo's recipe: 4x4 tokens
    mix = facts["mixture"]
    assert mix["heldout"] == 0.1 and sum(mix["groups"].values()) == mix["total"]
    assert sum(s["planned"] for s in mix["sources"]) == mix["total"]
    spec = load_spec(out / "mixtures" / "demo.yaml")
    assert spec.repetition == "error" and spec.heldout == 0.1  # so planned <= available is the planner's promise
    train = facts["train"]
    assert train["last"]["step"] == quick_demo["config"].train_steps
    assert train["last"]["text_loss"] < train["first"]["text_loss"] - 1.0
    ev = facts["evaluate"]
    # counted independently: the held-out items of the spec, at the demo's cap per source
    held = heldout_items(spec, max_per_source=quick_demo["config"].eval_per_source)
    assert ev["n_generation"] == sum(it["record"]["kind"] == "generation" for it in held) > 0
    assert ev["n_understanding"] == sum(it["record"]["kind"] in ("understanding", "text", "video") for it in held)
    written = json.loads((out / "train" / "run" / "eval" / f"step-{train['last']['step']:06d}.json").read_text())
    assert written["generation/cosine"] == pytest.approx(ev["generation/cosine"])
    # every held-out pair has a shapes-world caption: the judge read them all, chance beside each metric
    assert ev["n_judged"] == ev["n_generation"]
    for m in ("background", "colour_at_position", "shape", "exact_scene"):
        assert 0 <= ev[f"generation/judge/{m}"] <= 1 and f"generation/judge/{m}/chance" in ev
    assert 0 <= ev["generation/free_rate"] <= 1
    assert any(k.startswith("understanding/exact_match/") for k in ev)  # by question type


def test_grid_decoder_and_gallery(quick_demo):
    from vpit.demo.recipe import DEMO_ENCODER
    from vpit.mixtures import make_plan
    from vpit.mixtures.sampler import make_schedule

    facts, out, cfg = quick_demo["facts"], quick_demo["out"], quick_demo["config"]
    grid = facts["grid"]
    seeds = list(range(cfg.grid_seeds))
    assert len(grid["rows"]) == cfg.grid_values**2 * len(seeds) and not grid["failed"]
    assert sorted({r["seed"] for r in grid["rows"]}) == seeds
    heat = json.loads(Path(grid["files"]["heatmaps"]).read_text())
    assert heat["rows"]["axis"] == "groups.understanding.count" and heat["columns"]["axis"] == "groups.generation.count"
    u, g = facts["mixture"]["groups"]["understanding"], facts["mixture"]["groups"]["generation"]
    assert heat["rows"]["values"] == [str(round(u / 2)), str(u)]
    assert heat["columns"]["values"] == [str(round(g / 4)), str(round(g / 2))]
    assert np.isfinite(np.array(heat["metrics"]["generation/cosine"], float)).all()
    assert np.isfinite(np.array(heat["spread"]["generation/cosine"], float)).all()  # two seeds: a spread
    assert Path(grid["files"]["correlation"]).stat().st_size > 1000 and Path(grid["files"]["pareto"]).is_file()
    # one pass over each cell's own mixture: its steps are the batches its plan holds
    base = out / "grid" / "base.yaml"
    for cell in (Path(grid["out"]) / "cells").iterdir():
        overrides = {**json.loads((cell / "cell.json").read_text())["overrides"]}
        batches = make_schedule(make_plan(load_spec(base, overrides)), 16).num_batches
        steps = [json.loads(line)["step"] for line in (cell / "run" / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, batches + 1)), cell.name
    # the law, its error and the optimum it predicted, run as one more cell per seed
    assert sorted(m.split("/")[0] for m in grid["law"]) == ["generation", "understanding"]
    assert all(v["rmse"] >= 0 for v in grid["law"].values())
    assert len(grid["optimum"]["cells"]) == len(seeds) and set(grid["optimum"]["measured"]) >= set(grid["law"])
    saved = json.loads((out / "demo.json").read_text())
    assert saved["grid"]["law"] == grid["law"] and saved["grid"]["optimum"]["predicted"]
    assert grid["findings"] and any(f.startswith("Asymmetry") for f in grid["findings"])

    dec = facts["decoder"]["heldout"]
    assert dec["matched_mse"] < dec["mismatched_mse"]  # the conditioning carries the image

    gallery = facts["generate images"]
    rows = gallery["rows"]
    assert len(rows) == cfg.prompts and len({r["prompt"] for r in rows}) == cfg.prompts
    training_text = (out / "raw" / "llava" / "data.jsonl").read_text(errors="replace")  # one bad record is not UTF-8
    import pyarrow.parquet as pq

    training_text += "\n".join(pq.read_table(out / "raw" / "pairs" / "urls.parquet").column("caption").to_pylist())
    for r in rows:
        caption = r["prompt"].removeprefix("Generate an image of ")
        assert caption not in training_text, f"{caption!r} was in the training data"
        assert Image.open(r["true"]).size == (64, 64)
        assert Image.open(r["generated"]).size == Image.open(r["from_true_tokens"]).size == (32, 32)
        assert r["verdict"].startswith("background ")
    # the gallery's cosines, recomputed from the tokens it saved and the true scenes it rendered
    encoder = load_encoder(DEMO_ENCODER)
    for i, r in enumerate(rows):
        gen = np.load(out / "gallery" / f"{i:02d}-generated.npy")
        true = encoder.encode([Image.open(r["true"]).convert("RGB")])[0].astype(np.float32)
        cos = np.sum(gen * true, -1) / (np.linalg.norm(gen, axis=-1) * np.linalg.norm(true, axis=-1))
        assert float(cos.mean()) == pytest.approx(r["cos_own"], abs=1e-4)
    # demo.json carries the judge's numbers with chance beside them, read from the decoded pixels
    judge = saved["judge"]
    assert judge["prompts"] == cfg.judged and set(judge["chance"]) == {
        "background",
        "colour_at_position",
        "shape",
        "exact_scene",
    }
    from vpit.judge import read_pixels

    first = read_pixels(Image.open(rows[0]["generated"]))  # the verdict is the judge's reading of the picture
    assert rows[0]["verdict"].startswith(f"background {first.background} ")


def test_report_html_and_markdown_show_every_stage(quick_demo):
    out, facts = quick_demo["out"], quick_demo["facts"]
    html = quick_demo["html"].read_text()
    md = quick_demo["markdown"].read_text()
    assert quick_demo["html"] == out / "report.html" and quick_demo["markdown"] == out / "report.md"
    for title in (
        "Raw data and ingest",
        "Mixture plan",
        "Training",
        "Evaluation on the held-out split",
        "Mixture grid",
        "Diffusion decoder",
        "Images from unseen prompts",
    ):
        assert title in html and title in md
    srcs = re.findall(r'<img src="([^"]+)"', html)
    expected = {
        "train/run/loss.png",
        "mixtures/demo.ratio.png",
        "decoder/heldout.png",
        "decoder/loss.png",
        "grid/demo-grid/report/correlation.png",
        "grid/demo-grid/report/pareto.png",
        "grid/demo-grid/report/heatmap_generation_cosine.png",
    }
    assert expected <= set(srcs)
    assert sum(s.startswith("gallery/") for s in srcs) == 3 * quick_demo["config"].prompts
    for src in srcs:
        assert not src.startswith("/") and (out / src).stat().st_size > 0, src
        assert f"]({src})" in md  # the markdown shows the same images
    assert f"plan hash <code>{facts['mixture']['hash']}</code>" in html
    assert "path_escape 1" in html and "download_disallowed 1" in html  # quarantine reasons with their counts
    assert f"{facts['evaluate']['generation/cosine']:.4g}" in html


def test_demo_refuses_a_used_folder_and_bad_settings(quick_demo, capsys):
    from vpit.cli import main

    with pytest.raises(ValueError, match="already holds a demo"):
        run_demo(quick_demo["out"], DemoConfig.quick())
    with pytest.raises(ValueError, match=r"samples: expected >= 50 .*\n  prompts: expected >= 2"):
        DemoConfig(samples=10, prompts=1)
    assert main(["demo", "--quick", "--samples", "10", "-o", str(quick_demo["out"].parent / "x")]) == 2
    assert "vpit demo: error: invalid demo settings" in capsys.readouterr().err
