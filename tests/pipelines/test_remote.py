"""Ingest and precompute write to S3 (moto's server on 127.0.0.1, reached through the standard AWS
variables only): a killed ingest finishes on re-run with no lost and no duplicated sample, and a
killed precompute to S3 finishes on re-run with the same token files as one on local disk."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.mixtures.helpers import upload_folder
from vpit import storage
from vpit.common import vpit_argv
from vpit.demo.corpora import write_llava_dataset
from vpit.model.encoder import EncoderConfig
from vpit.pipelines.card import read_card
from vpit.pipelines.ingest import run_ingest
from vpit.pipelines.llava import LlavaAdapter, LlavaConfig
from vpit.pipelines.precompute import PrecomputeConfig, run_precompute
from vpit.pipelines.shards import load_manifest, read_records_parquet, records_path
from vpit.pipelines.token_cache import TokenCache, available_fingerprints, check_cache

ROOT = Path(__file__).resolve().parents[2]


def _journal_objects(fs, path: str) -> int:
    try:
        return len(fs.ls(f"{path}/journal", refresh=True))
    except FileNotFoundError:
        return 0


def test_an_ingest_to_s3_killed_midway_finishes_on_rerun_with_nothing_lost_or_repeated(s3, tmp_path):
    url, env = s3
    out = f"{url}/ds"
    info = write_llava_dataset(tmp_path / "raw", 600, seed=7)
    cmd = [*vpit_argv(), "ingest", "llava", str(info["jsonl"]), "--image-root", str(tmp_path / "raw")]
    cmd += ["-o", out, "--shard-size", "20", "--workers", "1"]
    env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}  # its own local Ray, like a user's run
    fs, path = storage.filesystem(out)  # no listing cache: the test lists folders that keep growing
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and _journal_objects(fs, path) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    proc.wait()
    killed = load_manifest(out)
    done = _journal_objects(fs, path)
    assert killed is not None and not killed["complete"], "the job must be killed midway for this test to mean anything"
    assert 3 <= done < 30

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{done} already complete" in rerun.stdout

    manifest = load_manifest(out)
    assert manifest["complete"] and len(manifest["shards"]) == 30
    assert _journal_objects(fs, path) == 0  # compacted into manifest.json
    ids: Counter = Counter()
    for entry in manifest["shards"]:
        tar = fs.cat_file(f"{path}/shards/{entry['name']}.tar")
        assert len(tar) == entry["tar_bytes"] and hashlib.sha256(tar).hexdigest() == entry["tar_sha256"]
        with storage.open_file(out, records_path(entry["name"]), entry["tar_sha256"]) as f:
            records = read_records_parquet(f)
        assert len(records) == entry["samples"]
        ids.update(json.loads(r)["origin"]["record_id"] for r in records)
    assert set(ids) == set(info["ids"]) and set(ids.values()) == {1}
    # the planner's catalog and the dataset card were put too
    assert {"kind.npy", "id_hash.npy", "catalog.json"} <= set(storage.list_sizes(out, "catalog"))
    assert read_card(out)["configs"][0]["data_files"][0]["path"] == "shards/*.tar"
    third = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "nothing to do: all 30 shards" in third.stdout, third.stdout + third.stderr
    shown = subprocess.run([*vpit_argv(), "inspect", out, "-n", "2"], env=env, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert f"samples  {sum(ids.values())}" in shown.stdout and "card     README.md: license" in shown.stdout
    assert shown.stdout.count("\n── ") == 2, shown.stdout


@pytest.fixture(scope="module")
def local_dataset(ray_local, tmp_path_factory) -> Path:
    """64 records in 8 shards, ingested to local disk, without a token cache."""
    out = tmp_path_factory.mktemp("remote")
    info = write_llava_dataset(out / "raw", 64, seed=3)
    config = LlavaConfig(input=str(info["jsonl"]), image_root=str(out / "raw"), source="shapes", shard_size=8)
    run_ingest(LlavaAdapter(config), out / "ds", workers=2, progress=False)
    return out / "ds"


def _markers(fs, path: str) -> int:
    try:
        return sum(p.endswith(".done.json") for p in fs.ls(path, detail=False, refresh=True))
    except FileNotFoundError:
        return 0


def _kill_session(sid: int) -> None:
    """SIGKILL everything a command started in its own session: the CLI, its Ray cluster and workers."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[3]) == sid:
                os.kill(int(stat.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def test_a_precompute_to_s3_killed_midway_finishes_on_rerun_and_writes_what_a_local_one_writes(
    local_dataset, s3, tmp_path
):
    url, env = s3
    local = tmp_path / "ds"
    shutil.copytree(local_dataset, local)
    remote = f"{url}/ds"
    fs, path = storage.filesystem(remote)  # no listing cache: the test lists folders that keep growing
    upload_folder(local, remote)

    encoder, config = EncoderConfig(encoder="tiny"), PrecomputeConfig(batch_size=4, actors=1)
    reference = run_precompute(local, encoder, config, progress=False)
    fp = reference.fingerprint
    # The command, in a process of its own: its Ray workers read the same standard AWS variables
    # (the test session's Ray was started without them). Killed once a shard is complete on S3.
    cmd = [*vpit_argv(), "precompute", remote, "--encoder", "tiny", "--batch-size", "4", "--actors", "1"]
    env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    with open(tmp_path / "first.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while proc.poll() is None and time.monotonic() < deadline and _markers(fs, f"{path}/tokens/{fp}") < 1:
                time.sleep(0.01)
            _kill_session(proc.pid)
            proc.wait(timeout=30)
        finally:
            _kill_session(proc.pid)
    done = check_cache(remote, fp)["ok"]
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-2000:]
    assert 1 <= len(done) < 8, "the job must be killed midway for this test to mean anything"

    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"fingerprint {fp}" in run.stdout and f"{len(done)} already complete" in run.stdout, run.stdout
    assert f"cache       {remote}/tokens/{fp}" in run.stdout
    assert check_cache(remote, fp)["ok"] == [f"shard-{i:06d}" for i in range(8)]
    assert available_fingerprints(remote) == [fp]
    for p in sorted((local / "tokens" / fp).iterdir()):
        got = fs.cat_file(f"{path}/tokens/{fp}/{p.name}")
        if p.name.endswith(".done.json"):
            assert json.loads(got) == json.loads(p.read_bytes())
        elif not p.name.startswith("."):
            assert got == p.read_bytes(), p.name
    # a re-run finds it complete (in this process: nothing is left to encode, so no worker reads
    # S3); the cache reads back through the node cache
    again = run_precompute(remote, encoder, config, progress=False)
    assert again.shards_written == 0 and again.shards_skipped == 8
    cache = TokenCache(remote, fp)
    assert cache.tokens(2, 3).shape[1:] == (cache.m, cache.dim)
