"""The shard store: WebDataset tars with a byte-offset index, and a dataset manifest.

Layout of a dataset folder:

    manifest.json                 shards in shard order, counts per kind, checksums, config
    manifest.journal.jsonl        during an ingest: one line per finished shard (compacted at the end)
    quarantine.jsonl              every rejected raw record (rebuilt from the parts below)
    shards/shard-000000.tar       plain WebDataset tar: KEY.json, KEY.img0.jpg, ...
    shards/shard-000000.idx.npz   the same offsets as compact arrays (what loaders read)
    shards/shard-000000.records.parquet  the JSON members alone (key, id, kind, json), row p =
                                  sample p: what a training node fetches from object storage
                                  instead of the image tar
    shards/shard-000000.idx.json  offset and size of every member, written last
    quarantine/shard-000000.jsonl this shard's rejections
    catalog/*.npy                 per-sample kind and held-out hash of the whole dataset (planning)

Tars are written with fixed metadata (mtime 0, uid 0, mode 0644) so the same samples
always give the same bytes, whatever machine or worker wrote them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path

from vpit import storage
from vpit.common import save_json_atomic
from vpit.errors import InputError
from vpit.pipelines.image_hash import dhash
from vpit.pipelines.open_files import DEFAULT_OPEN_SHARDS
from vpit.pipelines.sample import Sample
from vpit.pipelines.shard_index import index_arrays, load_shard_arrays, write_index_arrays
from vpit.records import Manifest, QuarantineLine, ShardEntry, ShardIndex

__all__ = [
    "FORMAT_VERSION",
    "Dataset",
    "ShardReader",
    "load_manifest",
    "open_tar",
    "read_records_parquet",
    "records_path",
    "shard_name",
    "write_records_parquet",
    "write_shard",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(root: Path, index: int, samples: Iterable[tuple[str, Sample]]) -> ShardIndex:
    """Write one shard's tar and then its index; return the index.

    `samples` yields (key, sample) in shard order. The index is written last, by atomic
    rename, so its presence means the tar beside it is complete.
    """
    shard_dir = root / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    name = shard_name(index)
    tar_path = shard_dir / f"{name}.tar"
    tmp_path = shard_dir / f"{name}.tar.tmp"
    entries, image_sha, image_dhash, records = [], [], [], []
    with tarfile.open(tmp_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, sample in samples:
            record = dict(sample.record, key=key)
            records.append(json.dumps(record, sort_keys=True, ensure_ascii=False))
            _add_member(tar, f"{key}.json", records[-1].encode())
            for entry, data in zip(record["images"], sample.images, strict=True):
                _add_member(tar, f"{key}.{entry['member']}", data)
            entries.append({"key": key, "id": record["id"], "kind": record["kind"]})
            image_sha.append([img["sha256"] for img in record["images"]])
            image_dhash += [dhash(data) for data in sample.images]  # near-duplicate key, for dedup and held-out
    # Offsets are read back from the finished tar rather than predicted while writing:
    # tarfile's header sizes then never have to be second-guessed.
    members: dict[str, dict[str, list[int]]] = {}
    with tarfile.open(tmp_path, "r") as tar:
        for info in tar:
            key, field = info.name.split(".", 1)
            members.setdefault(key, {})[field] = [info.offset_data, info.size]
    data = tmp_path.read_bytes()
    os.replace(tmp_path, tar_path)
    for entry in entries:
        entry["members"] = members[entry["key"]]
    idx = {
        "format_version": FORMAT_VERSION,
        "shard": name,
        "tar": f"shards/{name}.tar",
        "tar_bytes": len(data),
        "tar_sha256": hashlib.sha256(data).hexdigest(),
        "kinds": dict(sorted(Counter(e["kind"] for e in entries).items())),
        "samples": entries,
    }
    write_records_parquet(shard_dir / f"{name}.records.parquet", records)
    write_index_arrays(root, name, index_arrays(idx, image_sha, image_dhash))  # the compact index loaders read
    save_json_atomic(shard_dir / f"{name}.idx.json", idx)  # last: marks the shard whole
    return idx


def records_path(name: str) -> str:
    """A shard's records file, relative to the dataset root."""
    return f"shards/{name}.records.parquet"


def write_records_parquet(path: Path, records: list[str]) -> None:
    """The shard's JSON members, byte for byte, one row per sample in shard order. Parquet so
    that Ray Data, `datasets` and pandas read it as they are; the readable columns (key, id,
    kind) are for them, training reads `json`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parsed = [json.loads(r) for r in records]
    table = pa.table(
        {
            "key": pa.array([r["key"] for r in parsed], pa.string()),
            "id": pa.array([r["id"] for r in parsed], pa.string()),
            "kind": pa.array([r["kind"] for r in parsed], pa.string()),
            "json": pa.array(records, pa.string()),
        }
    )
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def read_records_parquet(source) -> list[str]:
    """The `json` column of a records file (a path or an open binary file)."""
    import pyarrow.parquet as pq

    return pq.read_table(source, columns=["json"]).column("json").to_pylist()


_SHARD_NAME = re.compile(r"^shard-\d{6,}$")


def load_manifest(root: str | Path) -> Manifest | None:
    """The dataset's manifest, or None when there is none. Shard names become paths, so a name that
    is not `shard-NNNNNN` (e.g. ../../etc/passwd) is refused: a manifest must not lead outside."""
    path = storage.join(root, MANIFEST)
    try:
        manifest = json.loads(storage.read_bytes(root, MANIFEST).decode("utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e}); re-run the ingest that wrote {root}") from None
    for entry in manifest.get("shards", []):
        name = entry.get("name")
        if not isinstance(name, str) or not _SHARD_NAME.match(name):
            raise InputError(
                f"{path}: shard name {name!r} is not a vpit shard name (shard-NNNNNN); the manifest was altered, "
                f"re-run the ingest that wrote {root}"
            )
    return manifest


class ShardReader:
    """Random access to one shard through its binary index: one positioned read per member."""

    def __init__(self, root: Path, name: str):
        self.root = Path(root)
        self.name = name
        self.index = load_shard_arrays(self.root, name)
        self.path = self.root / "shards" / f"{name}.tar"
        self._fd: int | None = None

    def __len__(self) -> int:
        return len(self.index)

    def json_index(self) -> ShardIndex:
        """The readable JSON index (member names, keys, ids): read on demand, never kept."""
        return json.loads((self.root / "shards" / f"{self.name}.idx.json").read_text(encoding="utf-8"))

    def _read(self, offset: int, size: int) -> bytes:
        if self._fd is None:
            self._fd = open_tar(self.path, self.index.tar_bytes)
        return os.pread(self._fd, int(size), int(offset))

    def read(self, position: int) -> Sample:
        record = json.loads(self._read(*self.index.json[position]))
        images = [self._read(*span) for span in self.index.image_spans(position)]
        return Sample(record=record, images=images)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self.read(i)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def open_tar(path: str | Path, expected_bytes: int, fd: int | None = None) -> int:
    """Open a shard's tar for reading (or take `fd`, already open on it); refuse one whose size
    differs from its index's."""
    fd = os.open(path, os.O_RDONLY) if fd is None else fd
    size = os.fstat(fd).st_size
    if size != expected_bytes:
        os.close(fd)
        raise InputError(
            f"{path} is {size} bytes but its index says {expected_bytes}: the shard changed after ingest "
            f"(truncated or overwritten); check it with `vpit verify {str(path).rsplit('/shards/', 1)[0]}` "
            "and re-run its ingest"
        )
    return fd


class Dataset:
    """A finished dataset folder: its manifest and readers for its shards."""

    def __init__(self, root: str | Path):
        self.root = storage.as_root(root)  # a URL: the manifest is read; readers need a local folder
        manifest = load_manifest(self.root)
        if manifest is None:
            raise InputError(f"{self.root} holds no {MANIFEST}: is it a vpit dataset (vpit ingest ...)?")
        self.manifest = manifest
        self._readers: OrderedDict[int, ShardReader] = OrderedDict()  # a few open shards, not all

    @property
    def shards(self) -> list[ShardEntry]:
        return self.manifest["shards"]

    def __len__(self) -> int:
        return sum(s["samples"] for s in self.shards)

    def reader(self, shard: int) -> ShardReader:
        if shard in self._readers:
            self._readers.move_to_end(shard)
        else:
            self._readers[shard] = ShardReader(self.root, self.shards[shard]["name"])
            while len(self._readers) > DEFAULT_OPEN_SHARDS:
                self._readers.popitem(last=False)[1].close()
        return self._readers[shard]

    def read(self, shard: int, position: int) -> Sample:
        return self.reader(shard).read(position)

    def __iter__(self) -> Iterator[Sample]:
        for entry in self.shards:
            reader = ShardReader(self.root, entry["name"])
            try:
                yield from reader
            finally:
                reader.close()

    def tar_paths(self) -> list[str]:
        return [str(self.root / "shards" / f"{s['name']}.tar") for s in self.shards]

    def quarantine(self) -> list[QuarantineLine]:
        try:
            text = storage.read_bytes(self.root, "quarantine.jsonl").decode("utf-8")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line]
