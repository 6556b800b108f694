"""The precompute job and the token cache, end to end on an ingested shapes-world dataset."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from vpit.common import vpit_argv
from vpit.demo.corpora import write_llava_dataset
from vpit.model.encoder import EncoderConfig, decode_image, tiny_encoder
from vpit.pipelines.ingest import run_ingest
from vpit.pipelines.llava import LlavaAdapter, LlavaConfig
from vpit.pipelines.precompute import PrecomputeConfig, run_precompute
from vpit.pipelines.shards import Dataset
from vpit.pipelines.token_cache import (
    CacheError,
    TokenCache,
    available_fingerprints,
    check_cache,
    from_storage,
    to_storage,
)

ROOT = Path(__file__).resolve().parents[2]
BATCH = 4  # every run compares bit for bit, so all use the same chunking
TINY = EncoderConfig(encoder="tiny")


@pytest.fixture(scope="module")
def dataset(ray_local, tmp_path_factory) -> Path:
    """96 records in 4 shards of 24: PNG and JPEG images, text-only and two-image samples."""
    out = tmp_path_factory.mktemp("precompute")
    info = write_llava_dataset(out / "raw", 96, seed=0)
    adapter = LlavaAdapter(
        LlavaConfig(
            input=str(info["jsonl"]), image_root=str(out / "raw"), source="shapes", shard_size=24, max_pixels=4_000_000
        )
    )
    run_ingest(adapter, out / "ds", workers=2, progress=False)
    return out / "ds"


@pytest.fixture(scope="module")
def cached(dataset):
    """The uninterrupted reference run: one actor."""
    return run_precompute(dataset, TINY, PrecomputeConfig(batch_size=BATCH, actors=1), progress=False)


def _fresh_copy(dataset: Path, dest: Path) -> Path:
    shutil.copytree(dataset, dest, ignore=shutil.ignore_patterns("tokens"))
    return dest


def _cache_files(root: Path, fp: str) -> dict[str, bytes]:
    d = root / "tokens" / fp
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.npy"))}


def test_cache_holds_every_image_in_record_order(dataset, cached):
    ds = Dataset(dataset)
    n_images = sum(len(s.record["images"]) for s in ds)
    assert (cached.shards_total, cached.shards_written, cached.images) == (4, 4, n_images)
    assert cached.fingerprint in available_fingerprints(dataset)
    cache = TokenCache(dataset, cached.fingerprint)
    assert (cache.m, cache.dim, cache.info["dtype"]) == (64, 32, "fp16")
    enc = tiny_encoder(TINY)
    kinds = set()
    for shard in range(len(ds.shards)):
        for pos, sample in enumerate(ds.reader(shard)):
            got = cache.tokens(shard, pos)
            assert got.dtype == np.float32 and got.shape == (len(sample.images), 64, 32)
            kinds.add(len(sample.images))
            if sample.images:  # a forward of this sample alone, rounded like the cache
                want = enc.encode([decode_image(b) for b in sample.images]).astype(np.float16).astype(np.float32)
                np.testing.assert_allclose(got, want, atol=2e-3, rtol=0)
                np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=2e-3)
    assert kinds == {0, 1, 2}  # text-only, one image, two images all occurred

    again = run_precompute(dataset, TINY, PrecomputeConfig(batch_size=BATCH), progress=False)
    assert (again.shards_written, again.shards_skipped, again.images) == (0, 4, 0)


def test_bf16_storage_round_trip_is_exact():
    import torch

    x = torch.randn(3, 4, 5)
    stored = to_storage(x, "bf16")
    assert stored.dtype == np.uint16
    np.testing.assert_array_equal(from_storage(stored, "bf16"), x.to(torch.bfloat16).float().numpy())
    np.testing.assert_array_equal(from_storage(to_storage(x, "fp16"), "fp16"), x.half().float().numpy())


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return float(np.mean(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))))


def test_int8_storage_is_half_of_fp16_and_keeps_so400m_shaped_features():
    """so400m-shaped tokens (64 x 1152), L2-normalised like the recipe's and raw (heavy-tailed):
    int8 with a per-token scale keeps a mean cosine to fp16 of at least 0.999."""
    import torch

    g = torch.Generator().manual_seed(0)
    raw = torch.randn(16, 64, 1152, generator=g) * torch.rand(16, 64, 1, generator=g) * 30
    raw[:, :, :8] *= 20  # a few outlier channels, as ViT features have
    for x in (raw, torch.nn.functional.normalize(raw, dim=-1)):
        fp16 = from_storage(to_storage(x, "fp16"), "fp16")
        q = to_storage(x, "int8")
        assert q.dtype == np.int8 and q.shape == (16, 64, 1154)
        assert _mean_cosine(from_storage(q, "int8"), fp16) >= 0.999
    per_image = {d: to_storage(raw[:1], d).nbytes for d in ("fp16", "int8")}
    assert per_image == {"fp16": 147_456, "int8": 73_856}  # 74 kB per so400m image, half of fp16


def test_an_int8_cache_reads_transparently_and_matches_fp16_on_real_images(dataset, cached):
    """The tiny encoder's tokens of the demo's shapes-world images, cached as int8: the reader
    returns float32 of the same shape, at a mean cosine of at least 0.999 to the fp16 cache."""
    int8 = run_precompute(
        dataset, EncoderConfig(encoder="tiny", dtype="int8"), PrecomputeConfig(batch_size=BATCH), progress=False
    )
    assert int8.fingerprint != cached.fingerprint  # the storage type is part of the fingerprint
    a, b = TokenCache(dataset, cached.fingerprint), TokenCache(dataset, int8.fingerprint)
    pairs = [(a.tokens(s, p), b.tokens(s, p)) for s in range(4) for p in range(24)]
    assert all(y.dtype == np.float32 and y.shape == x.shape for x, y in pairs)
    got = np.concatenate([y for _, y in pairs if len(y)])
    want = np.concatenate([x for x, _ in pairs if len(x)])
    assert _mean_cosine(got, want) >= 0.999
    ratio = int8.cache_bytes / cached.cache_bytes
    assert 0.45 < ratio < 0.55, ratio


def test_uint8_pixels_give_the_tokens_of_the_float_path(dataset):
    """Pixels travel as uint8 and are normalised on the encoder's device: the same tokens as the
    processor's float32 pixel values (to float rounding)."""
    from vpit.model.encoder import preprocess_images, resize_images

    enc = tiny_encoder(TINY)
    images = [decode_image(s.images[0]) for s in list(Dataset(dataset).reader(0))[:6] if s.images]
    u8 = resize_images(enc.processor, images)
    assert u8.dtype == np.uint8 and u8.nbytes * 4 == preprocess_images(enc.processor, images).nbytes
    np.testing.assert_allclose(
        enc.encode_uint8(u8).numpy(), enc.encode_pixels(preprocess_images(enc.processor, images)).numpy(), atol=1e-5
    )


def test_a_second_encoder_setting_caches_side_by_side(dataset, cached):
    bf16 = run_precompute(
        dataset, EncoderConfig(encoder="tiny", dtype="bf16"), PrecomputeConfig(batch_size=BATCH), progress=False
    )
    assert bf16.fingerprint != cached.fingerprint
    assert {cached.fingerprint, bf16.fingerprint} <= set(available_fingerprints(dataset))
    a, b = TokenCache(dataset, cached.fingerprint), TokenCache(dataset, bf16.fingerprint)
    assert np.load(b.dir / "shard-000000.npy", mmap_mode="r", allow_pickle=False).dtype == np.uint16
    for pos in range(5):  # the same fp32 tokens, rounded two ways
        np.testing.assert_allclose(a.tokens(1, pos), b.tokens(1, pos), atol=8e-3, rtol=0)


def test_same_tokens_with_one_and_two_actors(dataset, cached, tmp_path):
    two = _fresh_copy(dataset, tmp_path / "two")
    report = run_precompute(
        two, TINY, PrecomputeConfig(batch_size=BATCH, actors=2, actor_cpus=0.5, decode_cpus=0.5), progress=False
    )
    assert report.fingerprint == cached.fingerprint
    one_files, two_files = _cache_files(dataset, cached.fingerprint), _cache_files(two, report.fingerprint)
    assert len(one_files) == 8 and one_files == two_files  # tokens and offsets, byte for byte


def test_missing_stale_and_partial_caches_are_refused(dataset, cached, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(dataset, root)
    fp = cached.fingerprint
    with pytest.raises(
        CacheError,
        match=rf"has no token cache with fingerprint 0123456789abcdef \(all shards missing\); "
        rf"available: [0-9a-f, ]*{fp}[0-9a-f, ]*\. Build it with `vpit precompute {re.escape(str(root))} --encoder",
    ):
        TokenCache(root, "0123456789abcdef")

    # The dataset changes under the cache: shard 1 is re-ingested with other content.
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"][1]["tar_sha256"] = "0" * 64
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "tokens" / fp / "shard-000003.done.json").unlink()  # a shard whose marker never came
    fix = re.escape(f"Fix it with: vpit precompute {root} --encoder tiny --tokens 64 --dtype fp16 --compute-dtype fp32")
    with pytest.raises(CacheError, match=rf"stale: shard-000001; partial: shard-000003; .*{fix}$"):
        TokenCache(root, fp)
    assert available_fingerprints(root) == []

    tokens = root / "tokens" / fp / "shard-000000.npy"
    tokens.write_bytes(tokens.read_bytes()[:-100])  # truncated behind the marker's back
    assert check_cache(root, fp) == {
        "ok": ["shard-000002"],
        "missing": [],
        "stale": ["shard-000001"],
        "partial": ["shard-000000", "shard-000003"],
    }

    # The command the message names redoes exactly the three bad shards.
    report = run_precompute(root, TINY, PrecomputeConfig(batch_size=BATCH), progress=False)
    assert (report.shards_written, report.shards_skipped) == (3, 1)
    assert _cache_files(root, fp) == _cache_files(dataset, fp)
    TokenCache(root, fp)


def _session_pids(sid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # field 6 of /proc/PID/stat: the session id
            pids.append(int(stat.parent.name))
    return pids


def _kill_session(sid: int) -> None:
    """SIGKILL everything the subprocess started: the CLI, its local Ray cluster and workers."""
    for pid in _session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_kill_and_resume_matches_an_uninterrupted_run(dataset, cached, tmp_path, capsys):
    root = _fresh_copy(dataset, tmp_path / "ds")
    cmd = [*vpit_argv(), "precompute", str(root), "--encoder", "tiny", "--batch-size", str(BATCH)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, like a user's run
    markers = root / "tokens" / cached.fingerprint
    with open(tmp_path / "first.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while proc.poll() is None and time.monotonic() < deadline:
                if list(markers.glob("*.done.json")):  # first shard complete: kill the job midway
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.005)
            proc.wait(timeout=30)
        finally:
            _kill_session(proc.pid)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-2000:]
    states = check_cache(root, cached.fingerprint)
    assert states["ok"] and states["partial"], states  # killed with some shards whole and some half-written
    with pytest.raises(CacheError, match="partial: shard-"):
        TokenCache(root, cached.fingerprint)

    # The same command again, in this process: it joins the test session's warm Ray rather
    # than paying for a second cluster start.
    from vpit.cli import main

    assert main(cmd[3:]) == 0
    assert f"{len(states['ok'])} already complete" in capsys.readouterr().out
    assert _cache_files(root, cached.fingerprint) == _cache_files(dataset, cached.fingerprint)
    TokenCache(root, cached.fingerprint)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from vpit.cli import main

    assert main(["precompute", str(tmp_path), "--encoder", "tiny"]) == 2
    assert "holds no manifest.json" in capsys.readouterr().err
    assert main(["precompute", str(tmp_path), "--encoder", "tiny", "--tokens", "50"]) == 2
    assert "tokens: must be a perfect square" in capsys.readouterr().err
