"""`vpit dedup`: exact counts on planted duplicates, near duplicates found after re-encoding and
resizing, across datasets; the difference hash is in every new shard index."""

from __future__ import annotations

import io
import subprocess

import numpy as np
import pytest
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
    near = np.array(hashes, dtype=np.uint64)
    wide = group_labels(np.zeros(120, np.uint64), near, max_distance=4)
    assert all(wide[i] == wide[60 + i] for i in range(60))  # within 4 bits: every copy found
    assert len(set(wide.tolist())) == 60  # and no two distinct pictures joined
    default = group_labels(np.zeros(120, np.uint64), near)  # 2 bits: the scalable default
    found = sum(default[i] == default[60 + i] for i in range(60))
    assert found >= 45 and len(set(default.tolist())) == 120 - found  # most copies, nothing else
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


def test_an_index_from_before_near_hashes_reads_as_unknown_and_a_damaged_one_is_refused(tmp_path):
    from vpit.errors import InputError

    rng = np.random.default_rng(5)
    make_dataset(tmp_path / "a", "a", [["understanding"] * 3], images={0: _photo(rng)})
    npz = tmp_path / "a" / "shards" / "shard-000000.idx.npz"
    with np.load(npz) as z:
        old = {k: z[k] for k in z.files if k != "image_dhash"}
    np.savez(npz, **old)  # as vpit wrote it before difference hashes
    assert not load_shard_arrays(tmp_path / "a", "shard-000000").image_dhash.any()
    r = find_duplicates(DedupConfig(datasets=(str(tmp_path / "a"),)))
    assert r["no_near_hash"] == 3 and r["unhashed"] == 0
    np.savez(npz, **{k: v for k, v in old.items() if k != "images"})
    with pytest.raises(InputError, match="lacks images"):
        load_shard_arrays(tmp_path / "a", "shard-000000")


def test_the_card_of_an_empty_dataset_is_written_without_a_schema(tmp_path):
    from vpit.pipelines.card import card_metadata

    text = card_metadata(tmp_path, {"samples": 0, "shards": [], "kinds": {}}, None)
    assert "shards/*.tar" in text and "dataset_info" not in text
