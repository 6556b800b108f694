"""Fault injection: every long-running stage, killed, terminated, starved of disk, damaged.

For each stage (ingest llava, pairs, video and editing; precompute; train; grid run; decoder
train) it first runs the stage's `vpit` command cleanly (the reference), then, each time on a
fresh copy of its inputs:

  sigkill@t   SIGKILL of the whole process group at 5 random points, then the same command again;
  sigterm     SIGTERM at a random point (handled: one line and a clean exit), then again;
  ray-worker  one Ray worker process SIGKILLed mid-task (Ray stages), then again if it failed;
  disk-full   the output on a small tmpfs that fills up;
  read-only   the output on a read-only tmpfs;

and on a finished dataset: a flipped byte in a shard, a truncated token-cache file, a deleted
index, an index that disagrees with its tar (`vpit verify` must name the file and the fix; the
fix is run, then the dataset is checked again).

After each fault the command either completed or ended with one line (checked: no traceback);
the re-run's output is compared with the reference: samples lost and duplicated (by the input's
ids for ingest; rows and bytes for precompute; steps and sample ids for training; cells for the
grid). The table it prints is stage x fault -> survived?, lost, duplicated, message.

    python bench/faults.py [--kills 5] [--only ingest-llava,train] [--json]

Mounting tmpfs needs root (CI runs as root); where it is refused those faults are skipped
with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

KILLS = 5


def _vpit(*args: str) -> list[str]:
    from vpit.common import vpit_argv

    return vpit_argv(*args)


def _env() -> dict[str, str]:
    from vpit.common import subprocess_env

    env = subprocess_env(OMP_NUM_THREADS="1")
    env.pop("RAY_ADDRESS", None)  # every command starts its own local Ray, as a user's would
    return env


def _session_pids(sid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:
            pids.append(int(stat.parent.name))
    return pids


def _kill_session(sid: int, sig: int = signal.SIGKILL) -> None:
    for pid in _session_pids(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def run(cmd: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def run_with(cmd: list[str], cwd: Path, action: Callable[[subprocess.Popen], None] | None, timeout: float = 600):
    """Start `cmd` in its own session, call `action(proc)` from a timer thread, wait; kill leftovers."""
    import threading

    proc = subprocess.Popen(
        cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    if action is not None:
        threading.Thread(target=action, args=(proc,), daemon=True).start()
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        _kill_session(proc.pid)  # Ray processes the command left
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def one_line(res: subprocess.CompletedProcess) -> tuple[bool, str]:
    """(ended with one clear line and no traceback, that line)."""
    lines = [x for x in res.stderr.splitlines() if x.startswith("vpit ")]
    return ("Traceback" not in res.stderr and len(lines) == 1), (lines[-1] if lines else res.stderr.strip()[-200:])


# -- stages -----------------------------------------------------------------------------------


class Stage:
    """A stage: how to prepare its inputs in a folder, its command, and how to count its output."""

    name = ""
    ray = True

    def prepare(self, work: Path) -> None:
        """Write the inputs once (shared by every trial: they are never written to)."""

    def fresh(self, work: Path, trial: Path) -> None:
        """Set up a trial folder (outputs go under it)."""
        trial.mkdir(parents=True)

    def command(self, work: Path, trial: Path, out: Path) -> list[str]:
        raise NotImplementedError

    def ids(self, out: Path) -> Counter:
        """What the finished output holds, counted: compared with the reference's."""
        raise NotImplementedError


class IngestStage(Stage):
    """An ingest: its output is counted by sample id."""

    def ids(self, out):
        from vpit.pipelines.shards import Dataset

        return Counter(s.record["id"] for s in Dataset(out))


class IngestLlava(IngestStage):
    name = "ingest-llava"

    def prepare(self, work):
        from vpit.demo.corpora import write_bad_llava_records, write_llava_dataset

        info = write_llava_dataset(work / "raw", 600, seed=0)
        bad = write_bad_llava_records(work / "raw", bomb_side=1100)
        with open(info["jsonl"], "ab") as f:
            f.write(b"\n".join(bad) + b"\n")

    def command(self, work, trial, out):
        return _vpit(
            "ingest",
            "llava",
            str(work / "raw" / "data.jsonl"),
            "--image-root",
            str(work / "raw"),
            "-o",
            str(out),
            "--shard-size",
            "20",
            "--workers",
            "2",
            "--max-pixels",
            "1000000",
        )


class IngestPairs(IngestStage):
    name = "ingest-pairs"

    def prepare(self, work):
        from vpit.demo.corpora import write_pairs

        (work / "www").mkdir(parents=True)
        self.info = write_pairs(work, 300, "http://127.0.0.1:{PORT}", seed=2)

    def command(self, work, trial, out):
        return _vpit(
            "ingest", "pairs", str(work / "urls-live.parquet"), "-o", str(out), "--shard-size", "30", "--threads", "8"
        )


class IngestVideo(IngestStage):
    name = "ingest-video"

    def prepare(self, work):
        from vpit.demo.corpora import write_bad_clips, write_clips

        write_clips(work / "clips", 40, seed=0, frames=16)
        write_bad_clips(work / "clips")

    def command(self, work, trial, out):
        return _vpit(
            "ingest",
            "video",
            str(work / "clips"),
            "-o",
            str(out),
            "--k",
            "3",
            "--stride",
            "2",
            "--windows-per-clip",
            "2",
            "--shard-size",
            "4",
            "--workers",
            "2",
        )


class IngestEditing(IngestStage):
    name = "ingest-editing"

    def prepare(self, work):
        from vpit.demo.corpora import write_edit_triplets

        self.path = write_edit_triplets(work / "edits", 300, seed=0, layout="magicbrush", fmt="parquet")["path"]

    def command(self, work, trial, out):
        return _vpit("ingest", "editing", str(self.path), "-o", str(out), "--shard-size", "20", "--workers", "2")


class Precompute(Stage):
    name = "precompute"

    def prepare(self, work):
        from vpit.demo.corpora import write_llava_dataset

        info = write_llava_dataset(work / "raw", 400, seed=1)
        res = run(
            _vpit(
                "ingest",
                "llava",
                str(info["jsonl"]),
                "--image-root",
                str(work / "raw"),
                "-o",
                str(work / "ds"),
                "--shard-size",
                "20",
            ),
            work,
        )
        assert res.returncode == 0, res.stderr[-2000:]

    def fresh(self, work, trial):
        trial.mkdir(parents=True)
        shutil.copytree(work / "ds", trial / "ds", ignore=shutil.ignore_patterns("tokens", ".vpit-lock"))

    def command(self, work, trial, out):
        return _vpit("precompute", str(out), "--encoder", "tiny", "--batch-size", "8")

    def output(self, trial):
        return trial / "ds"

    def ids(self, out):
        """Every cached image row, by (shard, row, bytes hash): a lost row or a duplicated write shows."""
        import hashlib

        import numpy as np

        rows = Counter()
        for npy in sorted((out / "tokens").glob("*/shard-*[0-9].npy")):
            arr = np.load(npy, allow_pickle=False)
            for i, row in enumerate(arr):
                rows[(npy.name, i, hashlib.sha256(row.tobytes()).hexdigest()[:12])] += 1
        return rows


class Train(Stage):
    name = "train"
    ray = False

    def prepare(self, work):
        import numpy as np

        from vpit.model.tokenizer import train_bpe_tokenizer
        from vpit.shapes import caption, random_scene

        rng = np.random.default_rng(0)
        texts = [f"Generate an image of {caption(random_scene(rng))}" for _ in range(200)]
        train_bpe_tokenizer(texts, vocab_size=300).save_pretrained(work / "tok")

    def command(self, work, trial, out):
        cfg = trial / "train.yaml"
        cfg.write_text(f"""
output_dir: {out}
model: {{llm: tiny, tokenizer: {work / "tok"}, chat_template: chatml, vision_dim: 32, num_visual_tokens: 16,
         hidden_size: 32, num_heads: 2, intermediate_size: 64, num_layers: 1}}
data: {{synthetic: 800, max_len: 256, num_workers: 0}}
micro_batch_size: 8
max_steps: 40
lr: 1e-3
lr_reference_batch: 8
save_every: 4
loggers: []
""")
        return _vpit("train", str(cfg), "--resume")

    def ids(self, out):
        """Every (step, sample id) trained: a step trained twice or never shows."""
        steps = Counter()
        for line in (out / "metrics.jsonl").read_text().splitlines():
            steps[("step", json.loads(line)["step"])] += 1
        for line in (out / "samples-rank0.jsonl").read_text().splitlines():
            row = json.loads(line)
            for i in row["ids"]:
                steps[(row["step"], i)] += 1
        return steps


class Grid(Stage):
    name = "grid-run"

    def prepare(self, work):
        from tests.mixtures.helpers import make_dataset

        Train.prepare(self, work)
        make_dataset(work / "data", "g", [["understanding", "generation"] * 12, ["generation", "understanding"] * 8])
        res = run(_vpit("precompute", str(work / "data"), "--encoder", "tiny", "--tokens", "4"), work)
        assert res.returncode == 0, res.stderr[-2000:]
        from vpit.pipelines.token_cache import available_fingerprints

        fp = available_fingerprints(work / "data")[0]
        dim = json.loads((work / "data" / "tokens" / fp / "fingerprint.json").read_text())["dim"]
        (work / "base.yaml").write_text(f"""
seed: 0
heldout: 0.2
cache: {fp}
sources:
  vqa: {{path: data, group: understanding, kind: understanding}}
  pairs: {{path: data, group: generation, kind: generation}}
groups: {{understanding: 12, generation: 12}}
""")
        (work / "train.yaml").write_text(f"""
output_dir: unused
model: {{llm: tiny, tokenizer: {work / "tok"}, chat_template: chatml, vision_dim: {dim}, num_visual_tokens: 4,
         hidden_size: 32, num_heads: 2, intermediate_size: 64, num_layers: 1}}
data: {{mixture: base.yaml, max_len: 256, num_workers: 0}}
micro_batch_size: 4
max_steps: 4
lr: 1e-3
lr_reference_batch: 4
save_every: 2
loggers: []
""")

    def fresh(self, work, trial):
        trial.mkdir(parents=True)
        for name in ("base.yaml", "train.yaml"):
            shutil.copy(work / name, trial / name)
        (trial / "data").symlink_to(work / "data")
        (trial / "grid.yaml").write_text("""
name: faults
base: base.yaml
train: train.yaml
axes: {groups.generation.count: [6, 12]}
seeds: [0, 1]
eval: {suite: [understanding], every_steps: 0}
""")

    def command(self, work, trial, out):
        return _vpit("grid", "run", str(trial / "grid.yaml"), "-o", str(out))

    def ids(self, out):
        cells = Counter()
        for res in (out / "cells").glob("*/result.json"):
            run = res.parent / "run"
            for line in (run / "metrics.jsonl").read_text().splitlines():
                cells[(res.parent.name, json.loads(line)["step"])] += 1
        return cells


class Decoder(Stage):
    name = "decoder-train"
    ray = False

    def prepare(self, work):
        Precompute.prepare(self, work)
        res = run(_vpit("precompute", str(work / "ds"), "--encoder", "tiny", "--tokens", "16"), work)
        assert res.returncode == 0, res.stderr[-2000:]
        self.fp = next(p.name for p in (work / "ds" / "tokens").iterdir())

    def command(self, work, trial, out):
        return _vpit(
            "decoder", "train", str(work / "ds"), "--cache", self.fp, "-o", str(out), "--steps", "60", "--holdout", "8"
        )

    def ids(self, out):
        """The finished decoder's summary: it has no checkpoints, so a re-run trains it again, whole."""
        summary = json.loads((out / "summary.json").read_text())
        return Counter({("steps", summary["steps"]): 1})


STAGES = [IngestLlava(), IngestPairs(), IngestVideo(), IngestEditing(), Precompute(), Train(), Grid(), Decoder()]


# -- faults -----------------------------------------------------------------------------------


def _ray_worker_killer(delay: float):
    def act(proc: subprocess.Popen) -> None:
        time.sleep(delay)
        deadline = time.time() + 30
        while time.time() < deadline and proc.poll() is None:
            for pid in _session_pids(proc.pid):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                except OSError:
                    continue
                name = cmd.split("\0")[0]
                # a worker running one of the job's tasks or actors (ray::Map(work), ray::MapBatches(...)):
                # not an idle worker, not Ray's own agents and internal actors (ray::_StatsActor)
                if name.startswith("ray::") and not name.startswith(("ray::IDLE", "ray::_")) and "Agent" not in name:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    return
            time.sleep(0.05)

    return act


def _signal_at(delay: float, sig: int):
    def act(proc: subprocess.Popen) -> None:
        time.sleep(delay)
        if proc.poll() is None:
            if sig == signal.SIGKILL:
                _kill_session(proc.pid)
            else:
                os.kill(proc.pid, sig)  # the command itself, as a scheduler signals the job's process

    return act


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if res.returncode != 0:
        raise PermissionError(res.stderr.strip() or "mount refused")
    try:
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _compare(stage: Stage, out: Path, reference: Counter) -> tuple[int, int]:
    got = stage.ids(out)
    lost = sum((reference - got).values())
    duplicated = sum(max(0, got[k] - 1) for k in got) + sum(v for k, v in got.items() if k not in reference)
    return lost, duplicated


def stage_trials(stage: Stage, work: Path, rng: random.Random, kills: int, record) -> None:
    """The reference run, then every fault on a fresh trial folder, each recorded."""

    def trial_paths(tag: str) -> tuple[Path, Path]:
        trial = work / tag
        stage.fresh(work, trial)
        out = stage.output(trial) if hasattr(stage, "output") else trial / "out"
        return trial, out

    trial, out = trial_paths("reference")
    res = run(stage.command(work, trial, out), trial)
    if res.returncode != 0:
        record(stage.name, "reference", False, "-", "-", one_line(res)[1])
        return
    reference = stage.ids(out)
    # Timed again on a fresh folder: the first run pays one-off costs (DeepSpeed compiles a comm op
    # on a new machine), and kill points past the end of a warm run would never land.
    trial, out = trial_paths("warm")
    t0 = time.perf_counter()
    run(stage.command(work, trial, out), trial)
    seconds = time.perf_counter() - t0
    print(f"{stage.name}: reference run {seconds:.0f}s, {sum(reference.values())} items", flush=True)

    def rerun_and_check(fault: str, trial: Path, out: Path, first: subprocess.CompletedProcess) -> None:
        clean, line = one_line(first)
        again = run(stage.command(work, trial, out), trial)
        if again.returncode != 0:
            record(stage.name, fault, False, "-", "-", "re-run failed: " + one_line(again)[1])
            return
        lost, dup = _compare(stage, out, reference)
        ok = lost == 0 and dup == 0 and (first.returncode in (0, -9, 143) or clean)
        record(stage.name, fault, ok, lost, dup, "completed" if first.returncode == 0 else line or "killed")

    for k in range(kills):
        delay = rng.uniform(0.15, 0.9) * seconds
        trial, out = trial_paths(f"kill{k}")
        first = run_with(stage.command(work, trial, out), trial, _signal_at(delay, signal.SIGKILL))
        rerun_and_check(f"sigkill@{delay:.1f}s", trial, out, first)

    trial, out = trial_paths("sigterm")
    first = run_with(
        stage.command(work, trial, out), trial, _signal_at(rng.uniform(0.3, 0.8) * seconds, signal.SIGTERM)
    )
    rerun_and_check("sigterm", trial, out, first)

    if stage.ray:
        trial, out = trial_paths("rayworker")
        first = run_with(stage.command(work, trial, out), trial, _ray_worker_killer(0.3 * seconds))
        rerun_and_check("ray-worker", trial, out, first)

    for fault, ro in (("disk-full", False), ("read-only", True)):
        trial, out = trial_paths(fault)
        target = out / "tokens" if isinstance(stage, Precompute) else out  # the folder the stage writes
        try:
            with tmpfs(target, "256k", read_only=ro):
                first = run(stage.command(work, trial, out), trial)
            clean, line = one_line(first)
            ok = first.returncode == 0 or (clean and any(w in line for w in ("space", "read-only", "not accessible")))
            record(stage.name, fault, ok, 0, 0, line if first.returncode else "completed")
        except PermissionError as e:
            record(stage.name, fault, True, "-", "-", f"skipped: {e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=KILLS, help="random SIGKILL points per stage")
    ap.add_argument("--only", default="", help="comma-separated stage names")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--json", action="store_true", help="print the table as JSON on the last line")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work_root = Path(args.work or tempfile.mkdtemp(prefix="vpit-faults-"))
    rows: list[dict] = []
    only = set(filter(None, args.only.split(",")))

    def record(stage: str, fault: str, survived: bool, lost: int | str, dup: int | str, message: str) -> None:
        rows.append(
            {
                "stage": stage,
                "fault": fault,
                "survived": survived,
                "lost": lost,
                "duplicated": dup,
                "message": message[:110],
            }
        )
        verdict = "yes" if survived else "NO "
        print(f"  {stage:<15} {fault:<12} {verdict:<4} lost {lost!s:<4} dup {dup!s:<4} {message[:90]}", flush=True)

    from vpit.demo.corpora import serve_http

    with contextlib.ExitStack() as stack:
        for stage in STAGES:
            if only and stage.name not in only:
                continue
            work = work_root / stage.name
            work.mkdir(parents=True, exist_ok=True)
            stage.prepare(work)
            if isinstance(stage, IngestPairs):  # the pairs' web, for the whole run
                base = stack.enter_context(serve_http(work / "www"))
                import pyarrow as pa
                import pyarrow.parquet as pq

                table = pq.read_table(work / "urls.parquet")
                urls = [u.replace("http://127.0.0.1:{PORT}", base) for u in table.column("url").to_pylist()]
                col = table.schema.get_field_index("url")
                pq.write_table(table.set_column(col, "url", pa.array(urls)), work / "urls-live.parquet")

            stage_trials(stage, work, rng, args.kills, record)

    if "ingest-llava" in only or not only:
        rows += damage_trials(work_root / "damage", record)
    print()
    print(f"{'stage':<15} {'fault':<14} {'survived':<9} {'lost':<5} {'dup':<5} message")
    for r in rows:
        print(
            f"{r['stage']:<15} {r['fault']:<14} {'yes' if r['survived'] else 'NO':<9} {r['lost']!s:<5} "
            f"{r['duplicated']!s:<5} {r['message'][:70]}"
        )
    tried = [r for r in rows if not str(r["message"]).startswith("skipped")]
    print(
        f"\n{sum(r['survived'] for r in tried)}/{len(tried)} faults survived; "
        f"{sum(r['lost'] for r in tried if isinstance(r['lost'], int))} samples lost, "
        f"{sum(r['duplicated'] for r in tried if isinstance(r['duplicated'], int))} duplicated"
    )
    if args.json:
        print(json.dumps(rows))


def damage_trials(work: Path, record) -> list[dict]:
    """Damage a finished dataset four ways; `vpit verify` must say where and how to fix; the fix runs."""
    import numpy as np

    from vpit.demo.corpora import write_llava_dataset

    work.mkdir(parents=True, exist_ok=True)
    info = write_llava_dataset(work / "raw", 200, seed=4)
    ingest = _vpit(
        "ingest",
        "llava",
        str(info["jsonl"]),
        "--image-root",
        str(work / "raw"),
        "-o",
        str(work / "ds"),
        "--shard-size",
        "20",
    )
    assert run(ingest, work).returncode == 0
    assert run(_vpit("precompute", str(work / "ds"), "--encoder", "tiny"), work).returncode == 0
    clean = work / "ds-clean"
    shutil.copytree(work / "ds", clean)

    def fresh() -> Path:
        shutil.rmtree(work / "ds", ignore_errors=True)
        shutil.copytree(clean, work / "ds")
        return work / "ds"

    def flip(ds):
        tar = ds / "shards" / "shard-000003.tar"
        data = bytearray(tar.read_bytes())
        data[len(data) // 2] ^= 0xFF
        tar.write_bytes(bytes(data))
        return "shard-000003"

    def truncate(ds):
        npy = next((ds / "tokens").glob("*/shard-000002.npy"))
        npy.write_bytes(npy.read_bytes()[:-500])
        return "shard-000002"

    def delete_index(ds):
        (ds / "shards" / "shard-000004.idx.json").unlink()
        return "shard-000004"

    def disagree(ds):
        path = ds / "shards" / "shard-000005.idx.json"
        idx = json.loads(path.read_text())
        idx["samples"][2]["members"]["json"][0] += 512
        path.write_text(json.dumps(idx))
        return "shard-000005"

    for fault, damage, fix in (
        ("flipped-byte", flip, "ingest"),
        ("truncated-cache", truncate, "precompute"),
        ("deleted-index", delete_index, "ingest"),
        ("index-vs-tar", disagree, "ingest"),
    ):
        ds = fresh()
        shard = damage(ds)
        res = run(_vpit("verify", str(ds)), work)
        named = shard in res.stdout and ("fix" in res.stdout or "Fix" in res.stdout)
        clean_exit = res.returncode == 2 and "Traceback" not in res.stderr
        if fix == "ingest":  # what verify says: delete the shard's indexes, re-run the ingest
            for p in (ds / "shards").glob(f"{shard}.idx.*"):
                p.unlink()
            fixed = run(ingest, work)
        else:
            fixed = run(_vpit("precompute", str(ds), "--encoder", "tiny"), work)
        after = run(_vpit("verify", str(ds)), work)
        from vpit.pipelines.shards import Dataset

        got = Counter(s.record["origin"]["record_id"] for s in Dataset(ds))
        want = Counter(info["ids"])
        lost, dup = sum((want - got).values()), sum(max(0, v - 1) for v in got.values())
        same_tokens = all(
            np.array_equal(np.load(a, allow_pickle=False), np.load(clean / a.relative_to(ds), allow_pickle=False))
            for a in (ds / "tokens").glob("*/shard-*[0-9].npy")
        )
        ok = named and clean_exit and fixed.returncode == 0 and after.returncode == 0 and not lost and not dup
        ok = ok and same_tokens
        line = next((x for x in res.stdout.splitlines() if shard in x), res.stdout.strip()[-100:])
        record("dataset", fault, ok, lost, dup, line.strip())
    return []


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.mixtures.helpers for the grid stage
    main()
