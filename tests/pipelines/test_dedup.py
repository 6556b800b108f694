"""`vpit dedup`: exact counts on planted duplicates, near duplicates found after re-encoding and
resizing, across datasets; the difference hash is in every new shard index."""

from __future__ import annotations

import io
import subprocess

import numpy as np
from PIL import Image

from tests.mixtures.helpers import make_dataset
from vpit.common import subprocess_env, vpit_argv
from vpit.pipelines.dedup import DedupConfig, find_duplicates
from vpit.pipelines.image_hash import KNOWN, dhash, group_labels
from vpit.pipelines.shard_index import load_shard_arrays


def _photo(rng, side: int = 128) -> bytes:
    """A photo-like picture: a smooth random colour field."""
    img = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(
        (side, side), Image.Resampling.BICUBIC
    )
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _reencoded(data: bytes, side: int, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").resize((side, side)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_planted_duplicates_are_counted_exactly_within_and_across_datasets(tmp_path):
    rng = np.random.default_rng(1)
    photos = [_photo(rng) for _ in range(30)]
    # a: 20 samples on photos 0..9, twice each (10 groups of 2 within a)
    make_dataset(tmp_path / "a", "a", [["understanding"] * 20], images={i: photos[i % 10] for i in range(20)})
    # b: photos 5..14 once (5 of them also in a), then 10 re-encoded + resized copies of photos 20..29
    images = {i: photos[5 + i] for i in range(10)} | {10 + i: _reencoded(photos[20 + i], 96, 85) for i in range(10)}
    make_dataset(tmp_path / "b", "b", [["generation"] * 20], images=images)
    # c: the originals of photos 20..29
    make_dataset(tmp_path / "c", "c", [["generation"] * 10], images={i: photos[20 + i] for i in range(10)})
    r = find_duplicates(DedupConfig(datasets=(str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c"))))
    assert r["images"] == 50 and r["unhashed"] == 0 and r["no_near_hash"] == 0
    exact = r["exact"]
    # photos 0..4: 2 copies in a; photos 5..9: 2 in a + 1 in b; photos 10..14 and 20..29: single
    assert exact["groups"] == 10 and exact["images_with_a_copy"] == 25 and exact["removable"] == 15
    assert exact["groups_across_datasets"] == 5
    sizes = {i: len(photos[i]) for i in range(10)}
    assert exact["bytes_saved"] == sum(sizes[i] for i in range(5)) + sum(2 * sizes[i] for i in range(5, 10))
    near = r["near"]  # and the 10 re-encoded, resized copies join their originals in c
    assert near["groups"] >= 20 and near["removable"] >= 25 and near["groups_across_datasets"] >= 15
    assert near["top"][0]["images"] == 3


def test_near_hash_survives_reencoding_and_resizing_and_tells_pictures_apart():
    rng = np.random.default_rng(2)
    photos = [_photo(rng, 256) for _ in range(60)]
    hashes = [dhash(p) for p in photos] + [dhash(_reencoded(p, 160, 80)) for p in photos]
    assert all(h & int(KNOWN) for h in hashes)
    labels = group_labels(np.zeros(120, np.uint64), np.array(hashes, dtype=np.uint64))
    assert all(labels[i] == labels[60 + i] for i in range(60))  # every copy found
    assert len(set(labels.tolist())) >= 55  # and distinct pictures mostly kept apart
    assert dhash(b"not an image") == 0


def test_new_indexes_hold_the_near_hash_and_the_command_prints_a_summary(tmp_path):
    rng = np.random.default_rng(3)
    photo = _photo(rng)
    make_dataset(tmp_path / "a", "a", [["understanding"] * 4], images={0: photo, 1: photo})
    arrays = load_shard_arrays(tmp_path / "a", "shard-000000")
    assert arrays.image_dhash[0] == arrays.image_dhash[1] == dhash(photo)
    res = subprocess.run(vpit_argv("dedup", str(tmp_path / "a")), env=subprocess_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "exact (same sha256): 2 images in 1 groups (0 across datasets); 1 copies removable" in res.stdout
    bad = subprocess.run(
        vpit_argv("dedup", str(tmp_path / "nothing")), env=subprocess_env(), capture_output=True, text=True
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "manifest.json" in bad.stderr
