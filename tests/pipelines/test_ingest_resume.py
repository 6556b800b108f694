"""A killed `vpit ingest` finishes on re-run with no duplicate and no lost sample."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

from vpit.common import vpit_argv
from vpit.demo.corpora import write_llava_dataset
from vpit.pipelines.ingest import JOURNAL
from vpit.pipelines.shards import Dataset, load_manifest

VPIT = vpit_argv()
ROOT = Path(__file__).resolve().parents[2]


def _recorded(out: Path) -> int:
    """Shards recorded as done: the manifest's and the journal's whole lines."""
    m = load_manifest(out) if (out / "manifest.json").exists() else None
    journal = out / JOURNAL
    lines = journal.read_bytes().split(b"\n")[:-1] if journal.exists() else []
    return (len(m["shards"]) if m else 0) + len(lines)


def _run(args, **kw):
    return subprocess.run(VPIT + args, cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


def test_sigkill_midway_then_rerun_completes_exactly(tmp_path):
    info = write_llava_dataset(tmp_path / "raw", 1200, seed=7)
    out = tmp_path / "ds"
    cmd = VPIT + [
        "ingest",
        "llava",
        str(info["jsonl"]),
        "--image-root",
        str(tmp_path / "raw"),
        "-o",
        str(out),
        "--shard-size",
        "20",
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and _recorded(out) < 3:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    proc.wait()
    killed = load_manifest(out)
    assert killed is not None and not killed["complete"], "the job must be killed midway for this test to mean anything"
    done = _recorded(out)  # finished shards are journal lines until the run ends
    assert 3 <= done < 60

    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{done} already complete" in rerun.stdout

    ds = Dataset(out)
    assert ds.manifest["complete"] and len(ds.shards) == 60
    ids = Counter(s.record["origin"]["record_id"] for s in ds)
    assert set(ids) == set(info["ids"]) and set(ids.values()) == {1}
    # a third run has nothing left to do
    third = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "nothing to do: all 60 shards" in third.stdout


def test_cli_user_errors_are_one_line(tmp_path):
    r = _run(
        ["ingest", "llava", str(tmp_path / "nope.jsonl"), "--image-root", str(tmp_path), "-o", str(tmp_path / "o")]
    )
    assert r.returncode == 2
    assert r.stderr.strip() == f"vpit ingest llava: error: input: {str(tmp_path / 'nope.jsonl')!r} is not a file"
    r = _run(["inspect", str(tmp_path)])
    assert r.returncode == 2 and "Traceback" not in r.stderr and "holds no manifest.json" in r.stderr


def test_cli_help_lists_every_command():
    from vpit.cli import COMMANDS

    r = _run(["--help"])
    assert r.returncode == 0
    for name in COMMANDS:
        assert name in r.stdout
    readme = (ROOT / "README.md").read_text()
    for name in COMMANDS:  # every subcommand is documented
        assert f"vpit {name}" in readme, f"README does not show `vpit {name}`"


def test_inspect_renders_samples_with_lineage(tmp_path, ray_local):
    from vpit.pipelines.ingest import run_ingest
    from vpit.pipelines.llava import LlavaAdapter, LlavaConfig

    info = write_llava_dataset(tmp_path / "raw", 12, seed=1)
    run_ingest(
        LlavaAdapter(
            LlavaConfig(input=str(info["jsonl"]), image_root=str(tmp_path / "raw"), source="shapes", shard_size=5)
        ),
        tmp_path / "ds",
        progress=False,
    )
    r = _run(["inspect", str(tmp_path / "ds"), "-n", "2"])
    assert r.returncode == 0, r.stderr
    assert "samples  12: text 1, understanding 11" in r.stdout
    assert "── shapes:000000000  [understanding]  from {'line': 1, 'record_id': 'shapes-000000'" in r.stdout
    assert "<image 0: img0.png 64x64 input>" in r.stdout
    first = json.loads(info["jsonl"].read_text().splitlines()[0])
    assert first["conversations"][1]["value"] in r.stdout
