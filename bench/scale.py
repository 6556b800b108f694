"""The data path at full scale: about 19.4k shards and 19.4M samples, B = 2048, 64 ranks.

It builds a synthetic full-scale layout in under 2 GB of disk: a few template shards written
by vpit's own shard writer, symlinked as every other shard, and a sparse so400m-shaped token
cache (64 x 1152 fp16), then measures, for rank 0 of 64 with one loader process:

  - plan time: two `kind:` filters over shards that mix kinds, and a 2% held-out split;
  - stream construction time, time to the first batch, steady ms per batch;
  - RSS and open files of the loader process after 200 batches, under `ulimit -n 1024`
    (and at 50 and 100, to show it flat);
  - the ingest driver's manifest cost per shard at the first and the last 100 shards of a
    20k-shard ingest: the journal append now, and the whole-manifest rewrite it replaced;
  - peak driver RSS when planning the ingest of a 1 GB JSON list, against `json.loads` of the
    whole file (what the driver did before), in the same run.

    python bench/scale.py [--json] [--work bench-data/scale] [--json-gb 1.0] [--baseline OLD_PYTHONPATH]

--baseline runs the planning and loader measurements once more with another vpit (a folder
holding its `vpit` package, e.g. an older commit laid out as vpit/ + stage folders), which plans
in every worker as vpit did before plans were saved: the "before" figures, on the same layout.

With --json the last line is a JSON object with plan_s, first_batch_s, ms_per_batch, rss_gb,
open_fds, manifest_cost_ratio (last/first), jsonlist_peak_rss_gb (and the raw figures).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PER_SHARD = 1000
DATASETS = {"und": 7000, "gen": 12400}  # shards: 7M understanding (+ text), 12.4M generation pairs
TEMPLATES = 4
B, RANKS, BATCHES = 2048, 64, 200
M, D = 64, 1152
FP = "scalebench000001"


def _template_kinds(name: str, t: int) -> list[str]:
    if name == "und":  # Cambrian-like: understanding with some text-only, mixed within shards
        return ["text" if (i + t) % 10 == 0 else "understanding" for i in range(PER_SHARD)]
    return ["generation"] * PER_SHARD


def _build_dataset(root: Path, name: str, n_shards: int) -> float:
    """Templates written by vpit's shard writer, then symlinks, a manifest and a sparse cache."""
    from vpit.common import save_json_atomic
    from vpit.pipelines.sample import Sample, image_entry
    from vpit.pipelines.shard_index import load_catalog_arrays
    from vpit.pipelines.shards import FORMAT_VERSION, write_shard
    from vpit.shapes import caption, encode_image, random_scene, render

    rng = np.random.default_rng(0)
    shard_dir, cdir = root / "shards", root / "tokens" / FP
    cdir.mkdir(parents=True, exist_ok=True)
    templates = []
    for t in range(TEMPLATES):
        samples = []
        for i, kind in enumerate(_template_kinds(name, t)):
            scene = random_scene(rng)
            img = [] if kind == "text" else [encode_image(render(scene, 8))]
            user = [{"text": f"Generate an image of {caption(scene)}"}] if kind == "generation" else []
            if kind == "understanding":
                user = [{"image": 0}, {"text": "What is in the picture?"}]
            if kind == "text":
                user = [{"text": f"Describe {caption(scene)}."}]
            answer = (
                [{"text": "Here is an image:"}, {"image": 0}] if kind == "generation" else [{"text": caption(scene)}]
            )
            record = {
                "id": f"{name}:t{t}:{i:06d}",
                "source": name,
                "kind": kind,
                "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                "images": [image_entry(j, b, "bench", 10**6) for j, b in enumerate(img)],
                "origin": {"uri": "synthetic", "line": i + 1},
            }
            samples.append((f"{t * PER_SHARD + i:09d}", Sample(record=record, images=img)))
        idx = write_shard(root / "templates", t, samples)
        rows = sum(len(s.record["images"]) for _, s in samples)
        offsets = np.concatenate([[0], np.cumsum([len(s.record["images"]) for _, s in samples])]).astype(np.int64)
        np.save(root / "templates" / f"t{t}.offsets.npy", offsets)
        with open(root / "templates" / f"t{t}.tokens.npy", "wb") as f:  # sparse: header, then a hole
            header = {"descr": "<f2", "fortran_order": False, "shape": (rows, M, D)}
            np.lib.format.write_array_header_1_0(f, header)
            f.truncate(f.tell() + rows * M * D * 2)
        templates.append((idx, rows, (root / "templates" / f"t{t}.tokens.npy").stat().st_size))
    shard_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for s in range(n_shards):
        t = s % TEMPLATES
        idx, rows, size = templates[t]
        sname = f"shard-{s:06d}"
        for ext in (".tar", ".idx.json", ".idx.npz"):
            os.symlink(root / "templates" / "shards" / f"shard-{t:06d}{ext}", shard_dir / f"{sname}{ext}")
        os.symlink(root / "templates" / f"t{t}.tokens.npy", cdir / f"{sname}.npy")
        os.symlink(root / "templates" / f"t{t}.offsets.npy", cdir / f"{sname}.offsets.npy")
        marker = {"shard": sname, "tar_sha256": idx["tar_sha256"], "rows": rows, "samples": PER_SHARD, "bytes": size}
        (cdir / f"{sname}.done.json").write_text(json.dumps(marker))
        entries.append(
            {
                "name": sname,
                "shard": s,
                "samples": PER_SHARD,
                "kinds": idx["kinds"],
                "tar_bytes": idx["tar_bytes"],
                "tar_sha256": idx["tar_sha256"],
                "quarantined": {},
                "records": [s * PER_SHARD, (s + 1) * PER_SHARD],
            }
        )
    kinds: dict[str, int] = {}
    for e in entries:
        for k, v in e["kinds"].items():
            kinds[k] = kinds.get(k, 0) + v
    save_json_atomic(
        root / "manifest.json",
        {
            "format": "vpit-shards",
            "format_version": FORMAT_VERSION,
            "config": {"bench": name},
            "config_hash": name,
            "shards_planned": n_shards,
            "complete": True,
            "samples": n_shards * PER_SHARD,
            "kinds": kinds,
            "quarantined": {},
            "shards": entries,
        },
        indent=None,
    )
    settings = {"dtype": "fp16", "tokens": M, "layer": -1, "pooling": "bilinear", "normalize": "l2"}
    info = {
        "fingerprint": FP,
        "encoder": "so400m-shaped",
        "m": M,
        "dim": D,
        "settings": {**settings, "compute_dtype": "bf16"},
    }
    (cdir / "fingerprint.json").write_text(json.dumps(info))
    t0 = time.perf_counter()
    load_catalog_arrays(root, entries, (), write=True)  # what the end of an ingest writes
    return time.perf_counter() - t0


def _layout(work: Path) -> dict:
    done = work / "layout.json"
    if done.exists():
        return json.loads(done.read_text())
    shutil.rmtree(work / "data", ignore_errors=True)
    info = {}
    for name, n in DATASETS.items():
        t0 = time.perf_counter()
        info[f"catalog_build_s_{name}"] = _build_dataset(work / "data" / name, name, n)
        print(f"  built {name}: {n:,} shards, {n * PER_SHARD:,} samples in {time.perf_counter() - t0:.0f}s", flush=True)
    spec = work / "data" / "spec.yaml"
    spec.write_text(
        f"""
seed: 0
heldout: 0.02
cache: {FP}
sources:
  vqa:   {{path: und, group: understanding, kind: understanding}}
  chat:  {{path: und, group: understanding, kind: text}}
  pairs: {{path: gen, group: generation, kind: generation}}
groups:
  understanding: 6M
  generation: 12M
"""
    )
    info["spec"] = str(spec)
    done.write_text(json.dumps(info))
    return info


def _loader(spec: str, plan_dir: str) -> None:
    """The child: one loader process of rank 0 of 64, under ulimit -n 1024."""
    import psutil

    from vpit.mixtures import MixtureStream, load_spec
    from vpit.mixtures.plan import load_plan

    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
    me = psutil.Process()
    t0 = time.perf_counter()
    plan = load_plan(plan_dir, load_spec(spec))
    stream = MixtureStream(plan, global_batch_size=B, rank=0, world_size=RANKS)
    built = time.perf_counter() - t0
    it = iter(stream)
    first = next(it)
    first_s = time.perf_counter() - t0
    marks, times = {}, []
    for k in range(1, BATCHES + 1):
        t = time.perf_counter()
        batch = next(it)
        times.append(time.perf_counter() - t)
        assert len(batch) == B // RANKS and batch[0]["tokens"].shape[1:] == (M, D)
        if k in (50, 100, BATCHES):
            marks[k] = {"rss_gb": me.memory_info().rss / 2**30, "open_fds": len(os.listdir("/proc/self/fd"))}
    print(
        json.dumps(
            {
                "stream_build_s": built,
                "first_batch_s": first_s,
                "ms_per_batch": 1000 * float(np.median(times[20:])),
                "marks": marks,
                "first_len": len(first),
            }
        )
    )


def _loader_before(spec: str) -> None:
    """The child for --baseline: plan in the worker, then the same loop, under ulimit -n 1024."""
    import psutil

    from vpit.mixtures import MixtureStream, load_spec, make_plan

    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
    me = psutil.Process()
    t0 = time.perf_counter()
    plan = make_plan(load_spec(spec))
    plan_s = time.perf_counter() - t0
    stream = MixtureStream(plan, global_batch_size=B, rank=0, world_size=RANKS)
    it = iter(stream)
    out = {"plan_s": plan_s, "batches": 0, "error": None, "marks": {}}
    try:
        next(it)
        out["first_batch_s"] = time.perf_counter() - t0
        times = []
        for k in range(1, BATCHES + 1):
            t = time.perf_counter()
            next(it)
            times.append(time.perf_counter() - t)
            out["batches"] = k
            if k in (50, 100, BATCHES) or k % 10 == 0:
                out["marks"][k] = {"rss_gb": me.memory_info().rss / 2**30, "open_fds": len(os.listdir("/proc/self/fd"))}
        out["ms_per_batch"] = 1000 * float(np.median(times[20:]))
    except OSError as e:
        out["error"] = f"{type(e).__name__}: {e}"
    out["rss_gb"] = me.memory_info().rss / 2**30
    out["open_fds"] = len(os.listdir("/proc/self/fd"))
    print(json.dumps(out))


def _manifest_cost(work: Path, n: int = 20_000) -> dict:
    """Per-shard driver cost of recording a finished shard: journal append (now) against the
    manifest rewrite it replaced, at the first and the last 100 shards of an n-shard ingest."""
    from vpit.pipelines.ingest import _Journal, _write_manifest

    root = work / "manifest-cost"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    entry = {
        "name": "",
        "shard": 0,
        "samples": 1000,
        "kinds": {"understanding": 1000},
        "tar_bytes": 123456789,
        "tar_sha256": "ab" * 32,
        "quarantined": {"missing_image": 2},
        "records": [0, 1000],
    }
    journal, times, done = _Journal(root), [], {}
    for i in range(n):
        e = dict(entry, name=f"shard-{i:06d}", shard=i)
        t = time.perf_counter()
        journal.append(e)
        times.append(time.perf_counter() - t)
        done[i] = e
    journal.close()
    t = time.perf_counter()
    _write_manifest(root, {"bench": 1}, n, done)
    compact_s = time.perf_counter() - t
    old = {}
    for label, lo in (("first", 0), ("last", n - 100)):
        part = {i: done[i] for i in range(lo)}
        t = time.perf_counter()
        for i in range(lo, lo + 100):
            part[i] = done[i]
            _write_manifest(root, {"bench": 1}, n, part)
        old[label] = (time.perf_counter() - t) / 100
    shutil.rmtree(root)
    first, last = float(np.mean(times[:100])), float(np.mean(times[-100:]))
    return {
        "journal_ms_first": 1000 * first,
        "journal_ms_last": 1000 * last,
        "manifest_cost_ratio": last / first,
        "compact_s": compact_s,
        "rewrite_ms_first": 1000 * old["first"],
        "rewrite_ms_last": 1000 * old["last"],
        "rewrite_cost_ratio": old["last"] / old["first"],
    }


def _json_list(work: Path, gb: float) -> Path:
    path = work / f"llava-{gb:g}gb.json"
    if path.exists():
        return path
    rng = np.random.default_rng(0)
    words = "what is the colour of the shape in the top left corner a red circle blue square".split()
    target, written = int(gb * 2**30), 0
    with open(path.with_suffix(".tmp"), "w", encoding="utf-8") as f:
        f.write("[\n")
        i = 0
        while written < target:
            q = " ".join(rng.choice(words, 12))
            rec = {
                "id": f"llava-{i:08d}",
                "image": f"coco/train2017/{i:012d}.jpg",
                "conversations": [
                    {"from": "human", "value": f"<image>\n{q}?"},
                    {"from": "gpt", "value": " ".join(rng.choice(words, 40))},
                ],
            }
            text = ("" if i == 0 else ",\n") + json.dumps(rec)
            f.write(text)
            written += len(text)
            i += 1
        f.write("\n]\n")
    path.with_suffix(".tmp").rename(path)
    return path


def _peak_rss_of(code: str, *args: str) -> tuple[float, float, str]:
    """Run `code` in a fresh interpreter; (peak RSS GB, seconds, its stdout)."""
    t = time.perf_counter()
    probe = "import resource, sys\n" + code + "\nprint('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, check=True).stdout
    peak = int(next(line.split()[1] for line in out.splitlines() if line.startswith("PEAK")))
    return peak * 1024 / 2**30, time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="bench-data/scale", help="work folder (the layout is built once and reused)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON on the last line")
    ap.add_argument("--json-gb", type=float, default=1.0, help="size of the JSON list for the driver-memory figure")
    ap.add_argument("--baseline", help="PYTHONPATH of another vpit to measure planning and loading with")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--child-before", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _loader(*args.child)
    if args.child_before:
        return _loader_before(args.child_before)

    from vpit.common import quiet

    quiet()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"layout: {sum(DATASETS.values()):,} shards of {PER_SHARD}, sparse {M}x{D} fp16 token cache", flush=True)
    info = _layout(work)
    du = subprocess.run(["du", "-sh", str(work / "data")], capture_output=True, text=True).stdout.split()[0]

    from vpit.mixtures import load_spec, make_plan
    from vpit.mixtures.plan import save_plan

    t0 = time.perf_counter()
    plan = make_plan(load_spec(info["spec"]))
    save_plan(plan, work / "plan")
    plan_s = time.perf_counter() - t0
    print(f"plan (2 kind filters over mixed shards, 2% held out, cache checked): {plan_s:.1f}s", flush=True)
    for s in plan.sources:
        print(f"  {s.name:6s} {s.available:>12,} available  {s.count:>12,} planned")

    res = subprocess.run(
        [sys.executable, __file__, "--child", info["spec"], str(work / "plan")], capture_output=True, text=True
    )
    if res.returncode != 0:
        sys.exit(f"loader failed:\n{res.stderr[-3000:]}")
    loader = json.loads(res.stdout.strip().splitlines()[-1])
    marks = loader["marks"]
    print(
        f"loader, rank 0 of {RANKS}, B={B}: stream built in {loader['stream_build_s']:.2f}s, first batch at "
        f"{loader['first_batch_s']:.2f}s, {loader['ms_per_batch']:.1f} ms per batch"
    )
    print(
        "  RSS / open files after 50, 100, 200 batches: "
        + ", ".join(f"{marks[k]['rss_gb']:.2f} GB / {marks[k]['open_fds']}" for k in ("50", "100", str(BATCHES)))
    )

    cost = _manifest_cost(work)
    print(
        f"ingest manifest, per shard of 20k: journal {cost['journal_ms_first']:.3f} ms (first 100) -> "
        f"{cost['journal_ms_last']:.3f} ms (last 100), ratio {cost['manifest_cost_ratio']:.2f}; compaction "
        f"{cost['compact_s']:.2f}s once. The rewrite it replaced: {cost['rewrite_ms_first']:.2f} -> "
        f"{cost['rewrite_ms_last']:.1f} ms, ratio {cost['rewrite_cost_ratio']:.0f}"
    )

    path = _json_list(work, args.json_gb)
    size_gb = path.stat().st_size / 2**30
    plan_code = (
        "from pathlib import Path\nfrom vpit.pipelines.tabular import plan_rows\n"
        "tasks = plan_rows(Path(sys.argv[1]), 1000)\nprint('TASKS', len(tasks))"
    )
    peak_new, secs_new, _ = _peak_rss_of(plan_code, str(path))
    old_code = "import json\nrecords = json.loads(open(sys.argv[1], 'rb').read().decode('utf-8'))"
    peak_old, secs_old, _ = _peak_rss_of(old_code, str(path))
    print(
        f"JSON list of {size_gb:.2f} GB: driver peak RSS {peak_new:.2f} GB streaming ({secs_new:.0f}s) vs "
        f"{peak_old:.2f} GB parsing it whole ({secs_old:.0f}s, the old driver, before inlining the records)"
    )

    before = {}
    if args.baseline:
        env = {**os.environ, "PYTHONPATH": args.baseline}
        res = subprocess.run(
            [sys.executable, __file__, "--child-before", info["spec"]], capture_output=True, text=True, env=env
        )
        if res.returncode != 0:
            sys.exit(f"baseline loader failed:\n{res.stderr[-3000:]}")
        before = json.loads(res.stdout.strip().splitlines()[-1])
        print(
            f"before ({args.baseline}): plan in the worker {before['plan_s']:.1f}s; "
            + (f"first batch at {before['first_batch_s']:.1f}s; " if "first_batch_s" in before else "")
            + f"{before['batches']} batches, then RSS {before['rss_gb']:.2f} GB, {before['open_fds']} open files"
            + (f"; stopped: {before['error']}" if before["error"] else "")
        )

    figures = {
        "shards": sum(DATASETS.values()),
        "samples": sum(DATASETS.values()) * PER_SHARD,
        "disk": du,
        "plan_s": plan_s,
        "stream_build_s": loader["stream_build_s"],
        "first_batch_s": loader["first_batch_s"],
        "ms_per_batch": loader["ms_per_batch"],
        "rss_gb": marks[str(BATCHES)]["rss_gb"],
        "rss_gb_at_50": marks["50"]["rss_gb"],
        "open_fds": marks[str(BATCHES)]["open_fds"],
        "manifest_cost_ratio": cost["manifest_cost_ratio"],
        "rewrite_cost_ratio": cost["rewrite_cost_ratio"],
        "jsonlist_gb": size_gb,
        "jsonlist_peak_rss_gb": peak_new,
        "jsonlist_whole_parse_rss_gb": peak_old,
        **{k: v for k, v in info.items() if k.startswith("catalog_build")},
        **{f"before_{k}": v for k, v in before.items() if k != "marks"},
    }
    goals = {"plan_s": 10, "first_batch_s": 5, "rss_gb": 1, "open_fds": 300, "manifest_cost_ratio": 1.5}
    goals["jsonlist_peak_rss_gb"] = 2
    print(
        "\ngoals: "
        + ", ".join(f"{k} {figures[k]:.3g} (<= {g}) {'ok' if figures[k] <= g else 'MISSED'}" for k, g in goals.items())
    )
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
