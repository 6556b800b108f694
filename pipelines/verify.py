"""`vpit verify DATASET`: every shard against the manifest, every index against its tar.

Per shard, in order, stopping at the first problem it finds (the one to fix):

1. the tar exists and has the manifest's size;
2. its sha256 is the manifest's;
3. the tar's own headers list exactly the members the JSON index names, at the same offsets and
   sizes, and the binary index agrees with the JSON one;
4. every sample's JSON member parses and names the index's id, and every image member's bytes
   hash to the sha256 its record gives.

When the whole-file checksum differs, steps 3 and 4 locate the damage: the report gives the
first bad byte range of the tar and the sample it belongs to. Token caches are checked too
(missing, stale, partial shards). The fix for a damaged shard is printed: delete its index
and re-run the ingest, which redoes every shard without one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tarfile
from pathlib import Path
from typing import Any

from vpit import storage
from vpit.config import path_field
from vpit.errors import InputError, VpitError
from vpit.pipelines.ingest import file_sha256
from vpit.pipelines.shard_index import index_arrays, load_shard_arrays
from vpit.pipelines.shards import load_manifest

__all__ = ["ShardProblem", "VerifyConfig", "verify_dataset"]


class DatasetDamaged(VpitError):
    """`vpit verify` found damage; the message lists it with the fix."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class VerifyConfig:
    dataset: str = path_field()
    """Dataset folder to check (holds manifest.json)."""
    caches: bool = True
    """Also check every token cache beside the shards."""


@dataclasses.dataclass(frozen=True)
class ShardProblem:
    shard: str
    problem: str
    byte_range: tuple[int, int] | None = None
    """The first bad [start, end) bytes of the tar, when they are known."""


def _check_members(root: Path, name: str) -> ShardProblem | None:
    """Steps 3 and 4 for one shard: headers and index agree, members hash to their records."""
    tar_path = root / "shards" / f"{name}.tar"
    try:
        index = json.loads((root / "shards" / f"{name}.idx.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return ShardProblem(name, "its index shards/{name}.idx.json is missing".format(name=name))
    except ValueError as e:
        return ShardProblem(name, f"its JSON index is not valid JSON ({e})")
    expected = {f"{e['key']}.{field}": tuple(span) for e in index["samples"] for field, span in e["members"].items()}
    seen: dict[str, tuple[int, int]] = {}
    try:
        with tarfile.open(tar_path, "r") as tar:
            for info in tar:
                seen[info.name] = (info.offset_data, info.size)
    except (tarfile.TarError, OSError) as e:
        last = max((off + size for off, size in seen.values()), default=0)
        return ShardProblem(name, f"its tar headers do not parse after {len(seen)} members ({e})", (last, last + 512))
    for member, span in expected.items():
        if seen.get(member) != span:
            where = seen.get(member) or span
            return ShardProblem(
                name,
                f"member {member} is at {seen.get(member)} in the tar but at {span} in the index",
                (where[0], where[0] + where[1]),
            )
    extra = sorted(set(seen) - set(expected))
    if extra:
        off, size = seen[extra[0]]
        return ShardProblem(
            name, f"the tar holds {len(extra)} member(s) the index does not name: {extra[0]}", (off, off + size)
        )
    try:
        binary = load_shard_arrays(root, name)
    except InputError as e:
        return ShardProblem(name, str(e))
    want = index_arrays(index)
    for field in ("json", "kind", "ids", "image_start", "images"):
        if getattr(binary, field).tolist() != getattr(want, field).tolist():
            return ShardProblem(name, f"its binary index disagrees with its JSON index ({field})")
    with open(tar_path, "rb") as f:
        for entry in index["samples"]:
            off, size = entry["members"]["json"]
            f.seek(off)
            try:
                record = json.loads(f.read(size))
            except ValueError:
                return ShardProblem(name, f"sample {entry['id']}: its JSON member does not parse", (off, off + size))
            if record.get("id") != entry["id"]:
                return ShardProblem(
                    name, f"sample {entry['id']}: its JSON member names {record.get('id')!r}", (off, off + size)
                )
            for img in record.get("images", []):
                off, size = entry["members"][img["member"]]
                f.seek(off)
                if hashlib.sha256(f.read(size)).hexdigest() != img["sha256"]:
                    return ShardProblem(
                        name, f"sample {entry['id']}: image {img['member']} differs from its sha256", (off, off + size)
                    )
    return None


def verify_dataset(root: str | Path, caches: bool = True) -> tuple[list[ShardProblem], dict[str, Any]]:
    """([problems], {"shards", "bytes", "caches": {fingerprint: states}})."""
    from tqdm import tqdm

    if storage.is_remote(root):  # hashing every tar means reading every byte: do it where the bytes are
        raise InputError(
            f"{root}: vpit verify reads a local copy (it hashes every tar); copy the dataset down (e.g. "
            "`aws s3 sync URL DIR`) and verify DIR. On object storage each object is whole or absent, and a "
            "re-run ingest checks every shard's tar size against its entry"
        )
    root = Path(root)
    manifest = load_manifest(root)
    if manifest is None:
        raise InputError(f"{root} holds no manifest.json: is it a vpit dataset?")
    problems, checked_bytes = [], 0
    for entry in tqdm(manifest["shards"], desc="verify", unit="shard", disable=len(manifest["shards"]) < 20):
        name, tar = entry["name"], root / "shards" / f"{entry['name']}.tar"
        if not tar.is_file():
            problems.append(ShardProblem(name, "its tar is missing"))
            continue
        size = os.path.getsize(tar)
        checked_bytes += size
        problem = None
        if size != entry["tar_bytes"]:
            problem = ShardProblem(name, f"its tar is {size} bytes, the manifest says {entry['tar_bytes']}")
        elif file_sha256(tar) != entry["tar_sha256"]:
            problem = ShardProblem(name, "its tar's sha256 differs from the manifest's")
        located = _check_members(root, name)
        if located is not None:  # where the damage is (or why the index cannot be trusted)
            problem = ShardProblem(
                name, (problem.problem + "; " if problem else "") + located.problem, located.byte_range
            )
        if problem:
            problems.append(problem)
    states = {}
    if caches and (root / "tokens").is_dir():
        from vpit.pipelines.token_cache import check_cache

        for cdir in sorted(p for p in (root / "tokens").iterdir() if (p / "fingerprint.json").is_file()):
            states[cdir.name] = {k: v for k, v in check_cache(root, cdir.name).items() if v}
    return problems, {"shards": len(manifest["shards"]), "bytes": checked_bytes, "caches": states, "manifest": manifest}


def format_report(root: Path, problems: list[ShardProblem], facts: dict[str, Any]) -> str:
    lines = [f"dataset   {root}", f"shards    {facts['shards']} checked, {facts['bytes'] / 2**20:.1f} MiB read"]
    lines += [
        f"  BAD {p.shard}: {p.problem}"
        + (f" (first bad bytes {p.byte_range[0]}-{p.byte_range[1]} of shards/{p.shard}.tar)" if p.byte_range else "")
        for p in problems
    ]
    for fp, states in facts["caches"].items():
        bad = {k: v for k, v in states.items() if k != "ok"}
        lines.append(
            f"cache     {fp}: {len(states.get('ok', []))} shards ok"
            + "".join(f", {k}: {', '.join(v[:5])}" + (" ..." if len(v) > 5 else "") for k, v in bad.items())
        )
    for fp, states in facts["caches"].items():
        if set(states) - {"ok"}:
            import json

            from vpit.pipelines.token_cache import precompute_command

            info = json.loads((root / "tokens" / fp / "fingerprint.json").read_text(encoding="utf-8"))
            lines.append(
                f"fix       {precompute_command(root, info)}   (rewrites the partial, stale and missing shards "
                f"of cache {fp} and keeps the rest)"
            )
    if problems:
        cfg = facts["manifest"].get("config", {})
        names = " ".join(f"shards/{p.shard}.idx.*" for p in problems[:20])
        lines.append(
            f"fix       delete the damaged shards' indexes (cd {root} && rm {names}) and re-run the ingest that wrote "
            f"this dataset (`vpit ingest {cfg.get('adapter', '...')} ...` with the same input and --output): it "
            "redoes every shard without an index and keeps the rest"
        )
    return "\n".join(lines)
