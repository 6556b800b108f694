"""Kill-and-resume at world size 2 under DeepSpeed ZeRO-3 on CPU (gloo), on a real mixture.

An uninterrupted run gives the reference trajectory. A second run is SIGKILLed (torchrun and
both ranks, mid-step) once it has logged a few steps, then resumed with --resume from its
last complete checkpoint. Every step after that checkpoint must match the reference: the
same sample ids on each rank and the same losses (fp32, to 1e-6).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.train.conftest import run_vpit
from vpit.train.checkpoint import complete_checkpoints
from vpit.train.run_log import read_jsonl_by_step, read_metrics

STEPS = 24


def _config(path: Path, out: Path, mix: dict, tokenizer: str) -> Path:
    path.write_text(f"""
output_dir: {out}
model: {{llm: tiny, tokenizer: {tokenizer}, chat_template: chatml, vision_dim: {mix["d"]},
         num_visual_tokens: {mix["m"]}, hidden_size: 32, num_heads: 2, intermediate_size: 64}}
data: {{mixture: {mix["spec"]}, max_len: 160, num_workers: 1}}
micro_batch_size: 3
grad_accum: 2
max_steps: {STEPS}
lr: 3e-3
lr_reference_batch: 12
warmup_steps: 3
min_lr_ratio: 0.1
save_every: 4
keep_checkpoints: 10
""")
    return path


def _ids(run: Path, rank: int) -> dict[int, list[str]]:
    return {r["step"]: r["ids"] for r in read_jsonl_by_step(run / f"samples-rank{rank}.jsonl")}


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted_run_at_world_size_2(tmp_path, train_mixture, bpe_tokenizer):
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    ref = run_vpit(["train", str(_config(tmp_path / "ref.yaml", ref_dir, train_mixture, bpe_tokenizer))], nproc=2)
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = read_metrics(ref_dir)
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))

    # the run to kill: SIGKILL every process of it once it is well past a checkpoint
    cfg = _config(tmp_path / "cut.yaml", cut_dir, train_mixture, bpe_tokenizer)
    proc = run_vpit(["train", str(cfg)], nproc=2, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(read_metrics(cut_dir)) >= 9:
            break
        time.sleep(0.05)
    # torchrun starts each rank in a session of its own: kill the whole tree, ranks and loader workers too
    tree = psutil.Process(proc.pid)
    for p in [tree, *tree.children(recursive=True)]:
        p.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = len(read_metrics(cut_dir))
    assert 9 <= killed_at < STEPS, f"the run was not killed mid-way (logged {killed_at} steps)"
    resumed_from = complete_checkpoints(cut_dir)[-1][0]
    assert 4 <= resumed_from <= killed_at

    res = run_vpit(["train", str(cfg), "--resume"], nproc=2)
    (tmp_path / "resume.log").write_text(res.stdout + res.stderr)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from step-{resumed_from:08d}" in res.stdout, (resumed_from, killed_at, res.stdout[-1500:])
    resumed = read_metrics(cut_dir)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(reference[resumed_from:], resumed[resumed_from:]):
        for key in ("loss", "text_loss", "vision_loss", "lr"):
            assert abs(a[key] - b[key]) <= 1e-6, (a["step"], key, a[key], b[key])
        assert (a["tokens"], a["samples"]) == (b["tokens"], b["samples"])
    for rank in (0, 1):
        ref_ids, cut_ids = _ids(ref_dir, rank), _ids(cut_dir, rank)
        assert all(cut_ids[s] == ref_ids[s] for s in range(1, STEPS + 1))
    for name in ("metrics.jsonl", "samples-rank0.jsonl", "samples-rank1.jsonl"):  # the raw lines, not deduped
        steps = [json.loads(line)["step"] for line in (cut_dir / name).read_text().splitlines() if line.strip()]
        assert steps == list(range(1, STEPS + 1)), (name, steps)  # steps past the checkpoint logged once
    # the ranks saw different samples, and the run really learned something
    assert set(_ids(ref_dir, 0)[1]).isdisjoint(_ids(ref_dir, 1)[1])
    assert reference[-1]["text_loss"] < reference[0]["text_loss"]
    state = json.loads((complete_checkpoints(cut_dir)[-1][1] / "vpit_state.json").read_text())
    assert state == {"step": STEPS, "global_batch": 12, "plan_hash": train_mixture["hash"], "world_size": 2}
    assert (cut_dir / "loss.png").stat().st_size > 1000


def _wait_for_steps(run: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and len(read_metrics(run)) < n:
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_checkpoints_and_a_resume_at_world_size_1_continues_the_same_samples(
    tmp_path, train_mixture, bpe_tokenizer
):
    """Pre-emption at world 2 (torchrun passes SIGTERM on to both ranks): a checkpoint at the next
    step boundary and exit 0. The resume runs at world size 1 (grad_accum 4 keeps the global batch
    of 12): DeepSpeed refuses the ZeRO-3 shards of world 2, so the trainer re-cuts them as a
    universal checkpoint; every later step trains on the samples of the uninterrupted world-2 run,
    with the same losses to 1e-5."""
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    ref = run_vpit(["train", str(_config(tmp_path / "ref.yaml", ref_dir, train_mixture, bpe_tokenizer))], nproc=2)
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = read_metrics(ref_dir)

    cfg = _config(tmp_path / "cut.yaml", cut_dir, train_mixture, bpe_tokenizer)
    cfg.write_text(cfg.read_text().replace("save_every: 4", "save_every: 1000"))  # only the pre-emption saves
    log = open(tmp_path / "cut.log", "w")
    proc = run_vpit(["train", str(cfg)], nproc=2, stdout=log, stderr=subprocess.STDOUT)
    _wait_for_steps(cut_dir, 6, proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)  # torchrun itself exits non-zero after passing a signal on; the ranks exit 0
    text = (tmp_path / "cut.log").read_text()
    assert "stopped by SIGTERM after a checkpoint" in text, text[-2000:]
    assert "[rank0]: Traceback" not in text and "[rank1]: Traceback" not in text, text[-2000:]
    ckpts = complete_checkpoints(cut_dir)
    assert len(ckpts) == 1, ckpts
    stopped_at = ckpts[0][0]
    assert 6 <= stopped_at < STEPS
    assert json.loads((ckpts[0][1] / "vpit_state.json").read_text())["world_size"] == 2

    # a changed global batch is refused with what to do
    bad = run_vpit(["train", str(cfg), "--resume"])
    assert bad.returncode == 2
    assert "global batch of 12" in bad.stderr and "grad_accum" in bad.stderr, bad.stderr[-800:]

    # a rank killed after the checkpoint leaves lines of steps it trained again; rank 1 does not
    # exist at world size 1, so the resumed run must cut its log too (the rehearsal found
    # the ids of steps 3-4 logged twice after a 2 -> 1 resume)
    with open(cut_dir / "samples-rank1.jsonl", "a") as f:
        f.write(json.dumps({"step": stopped_at + 1, "ids": ["stale:0"]}) + "\n")
    res = run_vpit(["train", str(cfg), "--resume", "--set", "grad_accum=4"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert max(_ids(cut_dir, 1)) == stopped_at
    assert f"resumed from step-{stopped_at:08d} (saved at world size 2, re-cut for 1)" in res.stdout, res.stdout[-800:]
    assert (ckpts[0][1] / "universal" / "done").is_file()
    resumed = read_metrics(cut_dir)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(reference[stopped_at:], resumed[stopped_at:]):
        for key in ("loss", "text_loss", "vision_loss", "lr"):
            assert abs(a[key] - b[key]) <= 1e-5, (a["step"], key, a[key], b[key])
        assert (a["tokens"], a["samples"]) == (b["tokens"], b["samples"])
    ref0, ref1, cut0 = _ids(ref_dir, 0), _ids(ref_dir, 1), _ids(cut_dir, 0)
    for step in range(stopped_at + 1, STEPS + 1):
        assert sorted(cut0[step]) == sorted(ref0[step] + ref1[step]), step
