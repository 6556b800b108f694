"""`vpit verify`: every kind of damage on disk is found, located to its first bad bytes, with the fix."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.mixtures.helpers import make_dataset
from vpit.cli import main
from vpit.pipelines.verify import verify_dataset

U, G = "understanding", "generation"


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("verify") / "ds", "v", [[U, G, U], [G, U], [U]])


def _copy(clean, tmp_path):
    dst = tmp_path / "ds"
    shutil.copytree(clean, dst)
    return dst


def _member(root, shard: int, sample: int, field: str) -> tuple[int, int]:
    idx = json.loads((root / "shards" / f"shard-{shard:06d}.idx.json").read_text())
    return tuple(idx["samples"][sample]["members"][field])


def test_a_clean_dataset_verifies(clean, capsys):
    assert verify_dataset(clean)[0] == []
    assert main(["verify", str(clean)]) == 0
    assert "ok        every shard matches" in capsys.readouterr().out


def test_a_flipped_byte_is_located_to_its_member(clean, tmp_path, capsys):
    root = _copy(clean, tmp_path)
    off, size = _member(root, 1, 0, "img0.png")
    tar = root / "shards" / "shard-000001.tar"
    data = bytearray(tar.read_bytes())
    data[off + size // 2] ^= 0xFF
    tar.write_bytes(bytes(data))
    (problem,) = verify_dataset(root)[0]
    assert problem.shard == "shard-000001" and problem.byte_range == (off, off + size)
    assert "sha256 differs from the manifest" in problem.problem and "image img0.png differs" in problem.problem
    assert main(["verify", str(root)]) == 2
    out = capsys.readouterr()
    assert f"first bad bytes {off}-{off + size} of shards/shard-000001.tar" in out.out
    assert "rm shards/shard-000001.idx.*" in out.out and "Traceback" not in out.err


def test_a_deleted_index_and_an_index_that_disagrees_with_its_tar(clean, tmp_path):
    root = _copy(clean, tmp_path)
    (root / "shards" / "shard-000000.idx.json").unlink()
    idx_path = root / "shards" / "shard-000002.idx.json"
    idx = json.loads(idx_path.read_text())
    idx["samples"][0]["members"]["json"][0] += 512
    idx_path.write_text(json.dumps(idx))
    problems = {p.shard: p for p in verify_dataset(root)[0]}
    assert "idx.json is missing" in problems["shard-000000"].problem
    assert "in the tar but at" in problems["shard-000002"].problem and problems["shard-000002"].byte_range


def test_a_damaged_tar_header_and_a_truncated_token_file(clean, tmp_path, ray_local):
    from vpit.model.encoder import EncoderConfig
    from vpit.pipelines.precompute import PrecomputeConfig, run_precompute

    root = _copy(clean, tmp_path)
    fp = run_precompute(root, EncoderConfig(encoder="tiny", tokens=4), PrecomputeConfig(actors=1), progress=False)
    tokens = root / "tokens" / fp.fingerprint / "shard-000001.npy"
    tokens.write_bytes(tokens.read_bytes()[:-64])
    tar = root / "shards" / "shard-000000.tar"
    data = bytearray(tar.read_bytes())
    data[512 * 3 + 148] ^= 0x55  # a header's checksum field, a few members in
    tar.write_bytes(bytes(data))
    problems, facts = verify_dataset(root)
    (problem,) = problems
    assert problem.shard == "shard-000000" and problem.byte_range is not None
    assert facts["caches"][fp.fingerprint]["partial"] == ["shard-000001"]
