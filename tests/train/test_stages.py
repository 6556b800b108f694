"""A two-stage MetaMorph recipe as one spec and one run: stage 1 (frozen LLM) until a mixture
phase begins, its export, then stage 2 from that export, on one unbroken sample sequence."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.train.conftest import run_vpit
from vpit.train.checkpoint import complete_checkpoints
from vpit.train.run_log import read_jsonl_by_step, read_metrics


def _phased_spec(train_mixture: dict, path: Path) -> Path:
    spec = yaml.safe_load(Path(train_mixture["spec"]).read_text())
    spec.pop("groups")
    spec["sources"] = {
        k: dict(v, path=str(Path(train_mixture["spec"]).parent / v["path"])) for k, v in spec["sources"].items()
    }
    spec["phases"] = [
        {"name": "align", "groups": {"understanding": 38, "generation": 0}},  # 9.5 batches of 4
        {"name": "joint", "groups": {"understanding": 80, "generation": 60}},
    ]
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_stage_1_until_a_phase_then_stage_2_from_its_export_in_one_run(tmp_path, train_mixture, bpe_tokenizer):
    """Pre-empted in stage 1 (SIGTERM): a checkpoint, exit 0, no export; --resume finishes stage 1,
    exports it and trains stage 2 from it; the steps of both stages are the mixture's first
    batches in order, as one uninterrupted stream gives them."""
    spec = _phased_spec(train_mixture, tmp_path / "phased.yaml")
    run = tmp_path / "run"
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"""
output_dir: {run}
model: {{llm: tiny, tokenizer: {bpe_tokenizer}, chat_template: chatml, vision_dim: {train_mixture["d"]},
         num_visual_tokens: {train_mixture["m"]}, hidden_size: 32, num_heads: 2, intermediate_size: 64}}
data: {{mixture: {spec}, max_len: 160, num_workers: 0}}
micro_batch_size: 4
max_steps: 13
lr: 3e-3
stage: 1
stage2_from_phase: joint
save_every: 100
loggers: []
""")
    proc = run_vpit(["train", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(read_metrics(run / "stage1")) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by SIGTERM after a checkpoint" in out, out[-1000:]
    assert not (run / "stage1" / "export").exists() and complete_checkpoints(run / "stage1")
    assert not complete_checkpoints(run)  # stage 2 never started

    res = run_vpit(["train", str(cfg), "--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    # phase joint starts inside step 10 (sample 38 of batches of 4): stage 1 trains steps 1-9
    assert "stage 1 done (9 steps)" in res.stdout and "stage 2 starts at step 10" in res.stdout, res.stdout[-1500:]
    assert [r["step"] for r in read_metrics(run / "stage1")] == list(range(1, 10))
    assert [r["step"] for r in read_metrics(run)] == list(range(10, 14))
    assert (run / "stage1" / "export" / "vpit.json").is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["stage"] == 2 and saved["model"]["init_from"] == str(run / "stage1" / "export")
    assert yaml.safe_load((run / "stage1" / "config.yaml").read_text())["stage"] == 1

    # one unbroken sample sequence: the ids of steps 1-13 are those of the mixture's first 13 batches
    from vpit.mixtures import MixtureStream, load_spec, make_plan

    plan = make_plan(load_spec(spec))
    stream = MixtureStream(plan, global_batch_size=4, with_tokens=False)
    expected = [sorted(it["id"] for it in batch) for _, batch in zip(range(13), stream)]
    logs = [read_jsonl_by_step(f / "samples-rank0.jsonl") for f in (run / "stage1", run)]
    logged = {r["step"]: sorted(r["ids"]) for rows in logs for r in rows}
    assert [logged[s] for s in range(1, 14)] == expected

    again = run_vpit(["train", str(cfg)])
    assert again.returncode == 2 and "pass --resume" in again.stderr, again.stderr[-800:]
