"""The shard store: WebDataset tars with a byte-offset index, and a dataset manifest.

Layout of a dataset folder:

    manifest.json                 shards in shard order, counts per kind, checksums, config
    quarantine.jsonl              every rejected raw record (rebuilt from the parts below)
    shards/shard-000000.tar       plain WebDataset tar: KEY.json, KEY.img0.jpg, ...
    shards/shard-000000.idx.json  offset and size of every member, written last
    quarantine/shard-000000.jsonl this shard's rejections

Tars are written with fixed metadata (mtime 0, uid 0, mode 0644) so the same samples
always give the same bytes, whatever machine or worker wrote them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from vpit.common import save_json_atomic
from vpit.errors import InputError
from vpit.pipelines.sample import Sample
from vpit.records import Manifest, QuarantineLine, ShardEntry, ShardIndex

__all__ = [
    "FORMAT_VERSION",
    "Dataset",
    "ShardReader",
    "load_manifest",
    "shard_name",
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
    entries = []
    with tarfile.open(tmp_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, sample in samples:
            record = dict(sample.record, key=key)
            _add_member(tar, f"{key}.json", json.dumps(record, sort_keys=True, ensure_ascii=False).encode())
            for entry, data in zip(record["images"], sample.images, strict=True):
                _add_member(tar, f"{key}.{entry['member']}", data)
            entries.append({"key": key, "id": record["id"], "kind": record["kind"]})
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
    save_json_atomic(shard_dir / f"{name}.idx.json", idx)
    return idx


def load_manifest(root: Path) -> Manifest | None:
    path = Path(root) / MANIFEST
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


class ShardReader:
    """Random access to one shard through its index: one seek and one read per member."""

    def __init__(self, root: Path, name: str):
        self.root = Path(root)
        self.index = json.loads((self.root / "shards" / f"{name}.idx.json").read_text(encoding="utf-8"))
        self.path = self.root / self.index["tar"]
        self._file = None

    def __len__(self) -> int:
        return len(self.index["samples"])

    def _read(self, offset: int, size: int) -> bytes:
        if self._file is None:
            self._file = open(self.path, "rb")  # noqa: SIM115 - kept open for repeated seeks
        self._file.seek(offset)
        return self._file.read(size)

    def read(self, position: int) -> Sample:
        entry = self.index["samples"][position]
        members = entry["members"]
        record = json.loads(self._read(*members["json"]))
        images = [self._read(*members[img["member"]]) for img in record["images"]]
        return Sample(record=record, images=images)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self.read(i)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Dataset:
    """A finished dataset folder: its manifest and readers for its shards."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest = load_manifest(self.root)
        if manifest is None:
            raise InputError(f"{self.root} holds no {MANIFEST}: is it a vpit dataset (vpit ingest ...)?")
        self.manifest = manifest
        self._readers: dict[int, ShardReader] = {}

    @property
    def shards(self) -> list[ShardEntry]:
        return self.manifest["shards"]

    def __len__(self) -> int:
        return sum(s["samples"] for s in self.shards)

    def reader(self, shard: int) -> ShardReader:
        if shard not in self._readers:
            self._readers[shard] = ShardReader(self.root, self.shards[shard]["name"])
        return self._readers[shard]

    def read(self, shard: int, position: int) -> Sample:
        return self.reader(shard).read(position)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self.shards)):
            yield from self.reader(i)

    def tar_paths(self) -> list[str]:
        return [str(self.root / "shards" / f"{s['name']}.tar") for s in self.shards]

    def quarantine(self) -> list[QuarantineLine]:
        path = self.root / "quarantine.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
