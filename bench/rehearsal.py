"""The real training path rehearsed on CPU at world size 2 (gloo): a Llama-architecture LLM of
over 0.5B parameters saved as a local Hugging Face folder (random weights) and loaded through
`vpit train` as users load theirs, with so400m-shaped visual tokens (d = 1152).

In one run it measures:
  - per-rank peak anonymous RSS while the model is built (up to the DeepSpeed engine), with and without
    zero.Init: what zero.Init changes. The engine's own buffers (fp32 partitions, Adam states)
    are the same either way and live on the GPU in a real run; on CPU they sit in the same RSS,
    so the peak through the engine build is reported beside it;
  - the peak memory forward + backward adds, with and without gradient checkpointing: the same
    micro batch of ~300 tokens, in one world-1 process after a warm-up step;
  - steps/s;
  - a resume from 2 ranks to 1 and from 1 to 2 (through a universal checkpoint), each against
    the uninterrupted run: the same sample ids per step and the loss within 1e-5 (fp32). The
    chain: world 2 saves at step 2; world 1 resumes it and saves at step 3; world 2 resumes that.

    python bench/rehearsal.py [--json] [--work bench-data/rehearsal]

With --json the last line is a JSON object with rss_ratio_zero_init, mem_ratio_grad_ckpt,
resume_2_to_1_same_ids, resume_1_to_2_same_ids, resume_max_loss_diff (and the raw figures).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

STEPS = 4
GLOBAL_BATCH = 2  # micro batch 1 x world 2 x grad_accum 1, or x world 1 x grad_accum 2


def _anon_rss() -> int:
    """Anonymous resident memory of this process (bytes). Not RSS: the LLM's safetensors are
    memory-mapped, and their file pages are page cache (shared by the ranks of a node, dropped
    under pressure), not memory the process holds."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class _Peak:
    """A thread that samples anonymous RSS every 5 ms; `take()` returns the peak since the last take."""

    def __init__(self):
        self.peak, self._stop = _anon_rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _anon_rss())
            time.sleep(0.005)

    def take(self) -> int:
        peak, self.peak = max(self.peak, _anon_rss()), _anon_rss()
        return peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _child(config: str, sets: list[str], resume: bool, report: str, preempt_after: int | None) -> None:
    """One rank of a run: build the Trainer and train, noting the peak anonymous RSS of building
    the model (up to the DeepSpeed engine) and of the whole build."""
    import vpit.train.trainer as trainer_module
    from vpit.common import quiet
    from vpit.train.config import load_train_config
    from vpit.train.trainer import Trainer

    quiet()
    overrides = dict(s.split("=", 1) for s in sets)
    cfg = load_train_config(config, {k: json.loads(v) for k, v in overrides.items()})
    sampler, model_peak, initialize = _Peak(), [0], trainer_module.initialize

    def noting_the_model_peak(*args, **kwargs):  # the model is built; the engine is next
        model_peak[0] = sampler.take()
        return initialize(*args, **kwargs)

    trainer_module.initialize = noting_the_model_peak
    trainer = Trainer(cfg, resume=resume)
    build_peak = max(model_peak[0], sampler.take())
    sampler.stop()
    step_once = trainer.train_step

    def step_then_preempt(micro):
        row = step_once(micro)
        if trainer.step == preempt_after:  # stop as SLURM would: SIGUSR1, a checkpoint, exit 0
            os.kill(os.getpid(), signal.SIGUSR1)
        return row

    trainer.train_step = step_then_preempt
    t0 = time.perf_counter()
    start_step = trainer.step
    trainer.train()
    seconds = time.perf_counter() - t0
    rank = trainer.dist.rank
    Path(f"{report}.rank{rank}.json").write_text(
        json.dumps(
            {
                "model_peak_rss": model_peak[0],
                "build_peak_rss": build_peak,
                "steps": trainer.step - start_step,
                "seconds": seconds,
                "params": trainer.n_params,
            }
        )
    )


def _ckpt_ab(config: str, sets: list[str], report: str) -> None:
    """Gradient checkpointing on, then off, in one world-1 process on the same long micro batch:
    the peak anonymous memory forward + backward adds with each (after a warm-up step has made the
    gradient partitions and Adam states, which are the same either way)."""
    from vpit.common import quiet, release_freed_memory
    from vpit.train.config import load_train_config
    from vpit.train.trainer import Trainer

    quiet()
    cfg = load_train_config(config, {k: json.loads(v) for k, v in (s.split("=", 1) for s in sets)})
    trainer = Trainer(cfg)
    engine, llm = trainer.engine, trainer.engine.module.llm
    (batch,) = next(trainer.source.steps(0, 0, 1, 1, trainer.collate, 0))

    def step(sampler: _Peak | None = None) -> int:
        """One training step; the peak of its forward + backward (activations live there; the
        optimizer step's own peak, AdamW's temporaries, is the same either way). The heap is trimmed
        first: pages that glibc kept from the last step would be reused without showing in RSS."""
        release_freed_memory()
        before = _anon_rss()
        if sampler:
            sampler.take()
        out = engine(**batch.model_inputs(engine.device, trainer.dtype), return_token_losses=True)
        engine.backward(out.text_sum / max(batch.n_text, 1) + out.vision_sum / max(batch.n_vision, 1))
        added = sampler.take() - before if sampler else 0
        engine.step()
        return added

    engine.train()
    step()
    sampler, added = _Peak(), {}
    for name in ("grad_ckpt", "plain"):
        if name == "grad_ckpt":
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            llm.gradient_checkpointing_disable()
        added[name] = step(sampler)
    sampler.stop()
    trainer.close()
    Path(f"{report}.rank0.json").write_text(json.dumps({**added, "tokens": batch.n_tokens}))


def _llm_folder(work: Path) -> Path:
    """A ~0.54B Llama (380M in the decoder, 156M tied embedding of the Qwen2.5 vocabulary): at world
    size 2 in fp32 ZeRO-3 (shards, gradients, Adam states, DeepSpeed's fp32 partitions) two ranks
    peak near 19 GB together, what a 24 GB machine holds; 24 layers (0.66B) was killed for memory.
    Saved as released checkpoints are: bf16 safetensors, and the embedding padded to Qwen2.5's
    151,936 rows (spare rows past the tokenizer, so the image tokens need no resize)."""
    folder = work / "llama-0.54b-bf16"
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from vpit.model.tokenizer import load_tokenizer

    tok = load_tokenizer("qwen2.5")
    cfg = LlamaConfig(
        vocab_size=151_936,
        hidden_size=1024,
        intermediate_size=5504,
        num_hidden_layers=18,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _config(work: Path, llm: Path) -> Path:
    # The CPU config keeps every gathered parameter live (made for tiny models): at 0.5B that is
    # the whole model gathered beside its shards, over 12 GB per rank. A large model's settings
    # release them: live parameters and reuse distance bounded, as GPU configs do.
    from vpit.infra import config_file

    ds = json.loads(config_file("deepspeed", "zero3_cpu.json").read_text())
    ds["zero_optimization"].update(stage3_max_live_parameters=5e7, stage3_max_reuse_distance=5e7)
    (work / "zero3_cpu_large.json").write_text(json.dumps(ds, indent=1))
    path = work / "train.yaml"
    path.write_text(
        f"""
deepspeed: {work / "zero3_cpu_large.json"}
model: {{llm: {llm}, chat_template: chatml, vision_dim: 1152, num_visual_tokens: 64}}
data: {{synthetic: 64, max_len: 256, num_workers: 0}}
micro_batch_size: 1
max_steps: {STEPS}
lr: 1e-4
lr_reference_batch: {GLOBAL_BATCH}
save_every: 2
keep_checkpoints: 5
loggers: []
"""
    )
    return path


def _run(cfg: Path, out: Path, nproc: int, *sets: str, resume: bool = False, preempt_after: int = 0) -> dict:
    """`vpit train` (this file's child mode) under torchrun; the per-rank reports."""
    from vpit.common import TORCHRUN_SIGNALS, subprocess_env

    report = out.parent / f"{out.name}-report"
    argv = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *TORCHRUN_SIGNALS,
            __file__,
            "--child",
            str(cfg),
            "--report",
            str(report),
            "--set",
            f"output_dir={json.dumps(str(out))}",
            *[x for s in sets for x in ("--set", s)],
        ]
        + (["--resume"] if resume else [])
        + (["--preempt-after", str(preempt_after)] if preempt_after else [])
    )
    t0 = time.perf_counter()
    res = subprocess.run(argv, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"rehearsal run {out.name} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    ranks = [json.loads(Path(f"{report}.rank{r}.json").read_text()) for r in range(nproc)]
    wall = time.perf_counter() - t0
    model, peak = (max(r[k] for r in ranks) / 2**30 for k in ("model_peak_rss", "build_peak_rss"))
    print(
        f"{out.name} (world {nproc}): {wall:.0f}s, peak anonymous RSS per rank {model:.1f} GB building the model, "
        f"{peak:.1f} GB with the engine",
        flush=True,
    )
    return {"ranks": ranks, "wall_s": wall, "stdout": res.stdout}


def _ckpt_ab_run(cfg: Path, out: Path) -> dict:
    from vpit.common import subprocess_env

    report = out.parent / f"{out.name}-report"
    argv = [sys.executable, __file__, "--child", str(cfg), "--ckpt-ab", "--report", str(report)]
    sets = [f"output_dir={json.dumps(str(out))}", "micro_batch_size=3", "max_steps=1000", "save_every=1000"]
    t0 = time.perf_counter()
    res = subprocess.run(
        argv + [x for s in sets for x in ("--set", s)],
        env=subprocess_env(OMP_NUM_THREADS="2"),
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        sys.exit(f"rehearsal run {out.name} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    ab = json.loads(Path(f"{report}.rank0.json").read_text())
    print(
        f"{out.name} (world 1): {time.perf_counter() - t0:.0f}s, forward + backward of {ab['tokens']} tokens adds "
        f"{ab['grad_ckpt'] / 2**30:.2f} GB with gradient checkpointing, {ab['plain'] / 2**30:.2f} GB without",
        flush=True,
    )
    return ab


def _metrics(run: Path) -> dict[int, dict]:
    from vpit.train.run_log import read_jsonl_by_step, read_metrics

    rows = {r["step"]: r for r in read_metrics(run)}
    for f in run.glob("samples-rank*.jsonl"):
        for r in read_jsonl_by_step(f):
            rows[r["step"]].setdefault("ids", []).extend(r["ids"])
    return rows


def _cut_at(src: Path, dst: Path, step: int) -> None:
    """A copy of run `src` as if it had stopped after the checkpoint of `step`. The checkpoint's
    files are hard links (several GB; a resumed run only adds files beside them), the rest is
    copied (the resumed run appends to its metrics)."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=lambda d, names: ["checkpoints"] if Path(d) == src else [])
    (dst / "checkpoints").mkdir()
    for ckpt in (src / "checkpoints").iterdir():
        if not ckpt.name.startswith("step-"):
            shutil.copy2(ckpt, dst / "checkpoints" / ckpt.name) if ckpt.is_file() else None
        elif int(ckpt.name[5:]) <= step:
            shutil.copytree(ckpt, dst / "checkpoints" / ckpt.name, copy_function=os.link)


def _drop_checkpoints(run: Path, keep: int | None = None) -> None:
    """Free the disk of a finished run's checkpoints (all, or all but step `keep`)."""
    for ckpt in (run / "checkpoints").glob("step-*"):
        if keep is None or int(ckpt.name[5:]) != keep:
            shutil.rmtree(ckpt)


def _compare(ref: dict[int, dict], got: dict[int, dict], after: int, until: int = STEPS) -> tuple[bool, float]:
    same, diff = True, 0.0
    for step in range(after + 1, until + 1):
        same &= sorted(ref[step]["ids"]) == sorted(got[step]["ids"])
        diff = max(diff, *(abs(ref[step][k] - got[step][k]) for k in ("loss", "text_loss", "vision_loss")))
    return same, diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="bench-data/rehearsal", help="work folder (the LLM folder is reused)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON on the last line")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--report", help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--preempt-after", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt-ab", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child and args.ckpt_ab:
        return _ckpt_ab(args.child, args.set, args.report)
    if args.child:
        return _child(args.child, args.set, args.resume, args.report, args.preempt_after)

    t0 = time.perf_counter()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    for old in work.glob("run-*"):
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    llm = _llm_folder(work)
    cfg = _config(work, llm)
    print(f"LLM folder {llm}; world size 2 (gloo), {STEPS} steps of global batch {GLOBAL_BATCH}", flush=True)

    # A checkpoint of this model with its Adam states is about 6 GB per world: each run's are
    # dropped as soon as nothing needs them (the whole bench peaks near 30 GB of disk).
    ref2 = _run(cfg, work / "run-w2", 2, "gradient_checkpointing=true")
    _drop_checkpoints(work / "run-w2", keep=2)
    plain = _run(cfg, work / "run-w2-no-zero-init", 2, "zero_init=false", "max_steps=1", "save_every=1000")
    _drop_checkpoints(work / "run-w2-no-zero-init")
    # 2 -> 1: world 1 resumes world 2's step 2, trains step 3 and is pre-empted (SIGUSR1: a
    # checkpoint, exit 0); 1 -> 2: world 2 resumes that step-3 checkpoint and trains step 4
    _cut_at(work / "run-w2", work / "run-2to1", 2)
    r21 = _run(cfg, work / "run-2to1", 1, "grad_accum=2", "gradient_checkpointing=true", resume=True, preempt_after=3)
    # gradient checkpointing on and off on one micro batch of 3 samples packed in a row (the
    # rehearsal's steps carry ~100 tokens, where activations are lost beside ZeRO-3's buffers),
    # in one world-1 process: two ranks without checkpointing were OOM-killed here
    ab = _ckpt_ab_run(cfg, work / "run-ckpt-ab")
    _cut_at(work / "run-2to1", work / "run-1to2", 3)
    r12 = _run(cfg, work / "run-1to2", 2, "gradient_checkpointing=true", resume=True)
    for run in ("run-w2", "run-2to1", "run-1to2"):
        _drop_checkpoints(work / run)
    assert "re-cut for 1" in r21["stdout"] and "re-cut for 2" in r12["stdout"], (r21["stdout"], r12["stdout"])

    m2 = _metrics(work / "run-w2")
    same21, diff21 = _compare(m2, _metrics(work / "run-2to1"), 2, until=3)
    same12, diff12 = _compare(m2, _metrics(work / "run-1to2"), 3)
    rss_zero = max(r["model_peak_rss"] for r in ref2["ranks"])
    rss_plain = max(r["model_peak_rss"] for r in plain["ranks"])
    mem_ckpt, mem_plain = ab["grad_ckpt"], ab["plain"]
    r0 = ref2["ranks"][0]
    figures = {
        "params": r0["params"],
        "rss_build_zero_init_gb": rss_zero / 2**30,
        "rss_build_plain_gb": rss_plain / 2**30,
        "rss_ratio_zero_init": rss_zero / rss_plain,
        "rss_with_engine_zero_init_gb": max(r["build_peak_rss"] for r in ref2["ranks"]) / 2**30,
        "rss_with_engine_plain_gb": max(r["build_peak_rss"] for r in plain["ranks"]) / 2**30,
        "step_mem_grad_ckpt_gb": mem_ckpt / 2**30,
        "step_mem_plain_gb": mem_plain / 2**30,
        "mem_ratio_grad_ckpt": mem_ckpt / max(mem_plain, 1),
        "steps_per_s_world2": r0["steps"] / r0["seconds"],
        "resume_2_to_1_same_ids": same21,
        "resume_1_to_2_same_ids": same12,
        "resume_max_loss_diff": max(diff21, diff12),
        "seconds": time.perf_counter() - t0,
    }
    print(f"\nLlama {figures['params'] / 1e9:.2f}B params, visual tokens 64 x 1152, world size 2 (gloo, fp32)")
    print(
        f"peak anonymous RSS per rank building the model: {figures['rss_build_zero_init_gb']:.2f} GB with zero.Init vs "
        f"{figures['rss_build_plain_gb']:.2f} GB without: ratio {figures['rss_ratio_zero_init']:.2f} (goal <= 0.65); "
        f"through the engine build (+ fp32 partitions and Adam states, on the GPU in a real run): "
        f"{figures['rss_with_engine_zero_init_gb']:.2f} vs {figures['rss_with_engine_plain_gb']:.2f} GB"
    )
    print(
        f"memory forward + backward adds: {figures['step_mem_grad_ckpt_gb']:.2f} GB with gradient checkpointing vs "
        f"{figures['step_mem_plain_gb']:.2f} GB without: ratio {figures['mem_ratio_grad_ckpt']:.2f} (goal < 1)"
    )
    print(f"steps/s at world 2: {figures['steps_per_s_world2']:.3f}")
    print(
        f"resume 2 -> 1: same ids {same21}; 1 -> 2: same ids {same12}; max loss difference "
        f"{figures['resume_max_loss_diff']:.2e} (goal <= 1e-5)"
    )
    print(f"total {figures['seconds']:.0f}s")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
