"""Input hygiene and hostile files: every odd input is a clear quarantine line or a clear error,
never a crash, a lost record or a Python object address; no file vpit reads can run code."""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.mixtures.helpers import make_dataset
from vpit.demo.corpora import write_bad_llava_records, write_llava_dataset
from vpit.errors import VpitError
from vpit.pipelines.ingest import ingest_shard, run_ingest
from vpit.pipelines.llava import LlavaAdapter, LlavaConfig, _parse
from vpit.pipelines.sample import Rejected, check_image
from vpit.pipelines.shards import Dataset
from vpit.shapes import Scene, encode_image, render


def _ingest(inp: Path, root: Path, out: Path, shard_size: int = 8, workers: int = 2):
    cfg = LlavaConfig(input=str(inp), image_root=str(root), source="h", shard_size=shard_size, max_pixels=1_000_000)
    return run_ingest(LlavaAdapter(cfg), out, workers=workers, progress=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hyg")
    info = write_llava_dataset(root, 12, seed=9)
    lines = info["jsonl"].read_bytes().splitlines()
    return root, lines, info


def test_a_bom_at_the_start_loses_no_record(corpus, tmp_path, ray_local):
    root, lines, info = corpus
    path = root / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    report = _ingest(path, root, tmp_path / "ds")
    assert report.samples == 12 and report.quarantined == {}  # was: the first record malformed_json


def test_crlf_lines_give_the_same_samples(corpus, tmp_path, ray_local):
    root, lines, _ = corpus
    (root / "lf.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (root / "crlf.jsonl").write_bytes(b"\r\n".join(lines) + b"\r\n")
    _ingest(root / "lf.jsonl", root, tmp_path / "lf")
    _ingest(root / "crlf.jsonl", root, tmp_path / "crlf")
    a = [(s.record["messages"], s.images) for s in Dataset(tmp_path / "lf")]
    b = [(s.record["messages"], s.images) for s in Dataset(tmp_path / "crlf")]
    assert a == b and len(a) == 12


@pytest.mark.parametrize(
    "raw, reason, words",
    [
        (b'{"id": "x", "conversations": "a\x00b"}', "malformed_json", "Invalid control character"),
        (b"[" * 100_000 + b"]" * 100_000, "malformed_json", "nested too deeply"),
        (b'{"a": "' + b"x" * (17 * 1024 * 1024) + b'"}', "record_too_large", "records over"),
    ],
    ids=["nul-byte", "recursion-bomb", "huge-line"],
)
def test_odd_lines_are_quarantined_with_a_reason(raw, reason, words):
    with pytest.raises(Rejected) as e:
        _parse(raw)
    assert e.value.reason == reason and words in e.value.detail


def test_a_200_mb_line_is_quarantined_and_the_job_goes_on(corpus, tmp_path, ray_local):
    root, lines, _ = corpus
    path = root / "huge.jsonl"
    with open(path, "wb") as f:
        f.write(lines[0] + b"\n")
        f.write(b'{"id": "huge", "conversations": "' + b"y" * (200 * 1024 * 1024) + b'"}\n')
        f.write(lines[1] + b"\n")
    report = _ingest(path, root, tmp_path / "ds", workers=1)
    assert report.samples == 2 and report.quarantined == {"record_too_large": 1}
    (q,) = Dataset(tmp_path / "ds").quarantine()
    assert q["origin"]["line"] == 2


def test_a_million_line_jsonl_whose_last_line_is_bad_quarantines_only_that_line(tmp_path):
    """Planning a million lines is one streaming pass; the last shard holds the one bad line."""
    from vpit.pipelines.tabular import plan_rows

    root = tmp_path
    (root / "images").mkdir()
    good = b'{"id": "t%d", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}\n'
    with open(root / "big.jsonl", "wb") as f:
        for i in range(999_999):
            f.write(good % i)
        f.write(b'{"id": "last", "conversations": [\n')  # truncated
    tasks = plan_rows(root / "big.jsonl", 10_000)
    assert len(tasks) == 100 and tasks[-1]["records"] == [990_000, 1_000_000]
    adapter = LlavaAdapter(LlavaConfig(input=str(root / "big.jsonl"), image_root=str(root), shard_size=10_000))
    entry = ingest_shard(adapter, tmp_path / "ds", 99, tasks[-1])
    assert entry["samples"] == 9_999 and entry["quarantined"] == {"malformed_json": 1}
    (q,) = [json.loads(x) for x in (tmp_path / "ds" / "quarantine" / "shard-000099.jsonl").read_text().splitlines()]
    assert q["origin"]["line"] == 1_000_000


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose data is one tiny row."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 4)) + chunk(b"IEND", b"")
    )


def test_images_whose_header_lies_are_refused_without_decoding():
    with pytest.raises(Rejected) as e:  # claims 50k x 50k: refused from the header alone
        check_image(_png_with_size(50_000, 50_000), "image", max_pixels=64 * 1024 * 1024)
    assert e.value.reason == "image_too_large" and ("50000x50000" in e.value.detail or "2500000000" in e.value.detail)
    with pytest.raises(Rejected) as e:  # claims 300 x 300, holds far less
        check_image(_png_with_size(300, 300), "image", max_pixels=64 * 1024 * 1024)
    assert e.value.reason == "unreadable_image"


def test_exif_orientation_is_kept_not_applied_and_animations_read_their_first_frame():
    """The bytes are stored as they came; decoding ignores EXIF orientation (as LLaVA's loader
    does) and reads an animation's first frame."""
    from vpit.model.encoder import decode_image

    img = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    assert check_image(buf.getvalue(), "photo", 10**6) == ("jpg", 40, 20)
    assert decode_image(buf.getvalue()).size == (40, 20)

    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    for fmt, ext in (("GIF", "gif"), ("WEBP", "webp")):
        buf = io.BytesIO()
        frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
        assert check_image(buf.getvalue(), "anim", 10**6)[0] == ext
        first = np.asarray(decode_image(buf.getvalue()))
        assert first[..., 0].mean() > 200 and first[..., 2].mean() < 50  # red: the first frame


def test_two_identical_ingests_write_byte_identical_quarantines(tmp_path, ray_local):
    raw = tmp_path / "raw"
    info = write_llava_dataset(raw, 10, seed=1)
    bad = write_bad_llava_records(raw, bomb_side=1100)
    (raw / "mixed.jsonl").write_bytes(info["jsonl"].read_bytes() + b"\n".join(bad) + b"\n")
    _ingest(raw / "mixed.jsonl", raw, tmp_path / "a")
    _ingest(raw / "mixed.jsonl", raw, tmp_path / "b", workers=1)
    a, b = (tmp_path / "a" / "quarantine.jsonl").read_bytes(), (tmp_path / "b" / "quarantine.jsonl").read_bytes()
    assert a == b and b" object at 0x" not in a
    with pytest.raises(Rejected) as e:  # bytes PIL cannot identify: its message held the BytesIO's address
        check_image(b"<html>not an image</html>", "image (page.html)", 10**6)
    assert e.value.detail == "image (page.html): not an image format PIL can read"


# -- hostile files --------------------------------------------------------------------------


def test_a_manifest_naming_shards_outside_the_dataset_is_refused(tmp_path):
    from vpit.mixtures.catalog import build_catalog

    root = make_dataset(tmp_path / "ds", "hostile", [["understanding"]])
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"][0]["name"] = "../../../etc/passwd"
    (root / "manifest.json").write_text(json.dumps(manifest))
    for read in (lambda: Dataset(root), lambda: build_catalog(root, None, "sources.x.path")):
        with pytest.raises(VpitError, match=r"shard name '\.\./\.\./\.\./etc/passwd' .* not a vpit shard name"):
            read()


def test_yaml_with_python_tags_is_refused(tmp_path):
    from vpit.mixtures import load_spec

    spec = tmp_path / "evil.yaml"
    spec.write_text("seed: !!python/object/apply:os.system ['echo pwned']\nsources: {}\ngroups: {}\n")
    with pytest.raises(VpitError, match="not valid YAML"):
        load_spec(spec)


def test_npy_files_with_object_dtype_are_refused_never_unpickled(tmp_path):
    from vpit.pipelines.shard_index import load_shard_arrays

    root = make_dataset(tmp_path / "ds", "npy", [["understanding", "understanding"]])
    z = root / "shards" / "shard-000000.idx.npz"
    with open(z, "wb") as f:
        np.savez(f, json=np.array([object()], dtype=object))
    with pytest.raises(VpitError, match="not a readable shard index"):
        load_shard_arrays(root, "shard-000000")


def test_img2dataset_tars_with_hostile_members_are_refused(tmp_path):
    from vpit.pipelines.pairs import PairsAdapter, PairsConfig

    folder = tmp_path / "i2d"
    folder.mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"key": ["000000000"], "url": ["u"], "caption": ["c"], "status": ["success"]}),
        folder / "00000.parquet",
    )
    (folder / "00000_stats.json").write_text("{}")
    png = encode_image(render(Scene("white", ()), 16))
    for name, kind in (
        ("../../escape.jpg", tarfile.REGTYPE),
        ("/abs/000000000.jpg", tarfile.REGTYPE),
        ("000000000.jpg", tarfile.SYMTYPE),
    ):
        with tarfile.open(folder / "00000.tar", "w") as tar:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(png)
                tar.addfile(info, io.BytesIO(png))
        adapter = PairsAdapter(PairsConfig(input=str(folder)), folder)
        with pytest.raises(VpitError, match="hostile member"):
            list(adapter.read(adapter.plan()[0]))
    assert not (tmp_path / "escape.jpg").exists() and os.path.exists(folder)
