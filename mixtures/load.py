"""Load a mixture spec from YAML: includes, dotted overrides, strict key and type checks.

Order of resolution: each file's source paths are made absolute against that file's
folder; an `include:` is loaded first and the including file's keys are merged over it
(mappings merge key by key, a value of null deletes the key); then overrides apply, as
dotted paths (`groups.generation.count: 200k`), which is how a grid varies one number.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from vpit import storage
from vpit.errors import ConfigError, InputError
from vpit.mixtures.spec import HELDOUT_BY, UNITS, GroupSpec, MixtureSpec, PhaseSpec, SourceSpec, parse_count

__all__ = ["apply_overrides", "load_raw", "load_spec", "spec_from_dict"]

TOP_KEYS = {
    "include", "description", "seed", "repetition", "cache", "total", "heldout", "dedup", "sources", "groups",
    "phases", "unit", "tokenizer",
}  # fmt: skip
SOURCE_KEYS = {"path", "group", "kind"}
GROUP_KEYS = {"count", "weight", "split"}
PHASE_KEYS = {"name", "groups", "total"}


class _Problems(list):
    def check(self, ok: bool, msg: str) -> bool:
        if not ok:
            self.append(msg)
        return ok


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"mixture spec {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"mixture spec {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"mixture spec {path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _expand_groups(groups: Any) -> Any:
    if not isinstance(groups, dict):
        return groups
    return {k: (v if isinstance(v, dict) or v is None else {"count": v}) for k, v in groups.items()}


def _normalise(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Expand group shorthands (`understanding: 7M`), name phases, make paths absolute."""
    data = dict(data)
    if isinstance(data.get("groups"), dict):
        data["groups"] = _expand_groups(data["groups"])
    if isinstance(data.get("phases"), list):
        data["phases"] = [
            dict(ph, name=ph.get("name", f"phase{i + 1}"), groups=_expand_groups(ph.get("groups")))
            if isinstance(ph, dict)
            else ph
            for i, ph in enumerate(data["phases"])
        ]
    tok = data.get("tokenizer")
    if isinstance(tok, str) and (folder / tok).is_dir():  # a local tokenizer folder, relative to the YAML
        data["tokenizer"] = str((folder / tok).resolve())
    if isinstance(data.get("sources"), dict):
        sources = {}
        for name, src in data["sources"].items():
            if isinstance(src, dict) and isinstance(src.get("path"), str):
                src = dict(src, path=str(storage.as_root(src["path"], folder)))  # a URL stays as it is
            sources[name] = src
        data["sources"] = sources
    return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_raw(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The merged, normalised YAML mapping of `path` and everything it includes."""
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(p.name for p in (*_chain, path))
        raise ConfigError(f"include: include cycle {cycle}; remove one of these includes")
    data = _normalise(_read_yaml(path), path.parent)
    includes = data.pop("include", None)
    if includes is None:
        return data
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{path.name}: include: expected a file name or a list of them, got {includes!r}")
    merged: dict[str, Any] = {}
    for inc in includes:
        merged = _merge(merged, load_raw(path.parent / inc, (*_chain, path)))
    return _merge(merged, data)


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Set dotted paths in `data`. String values are read as YAML scalars ("3" -> 3, "null" deletes)."""
    data = _normalise(data, folder)
    for dotted, value in overrides.items():
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else value
        keys = dotted.split(".")
        if not all(keys):
            raise ConfigError(f"override {dotted!r}: empty key in dotted path")
        node = data
        for i, k in enumerate(keys[:-1]):
            if isinstance(node, list):  # phases: by name (phases.stage2...) or by position (phases.1...)
                k = _list_index(node, k, dotted)
                child = node[k] = dict(node[k])
                node = child
                continue
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            elif isinstance(child, list):
                child = node[k] = list(child)
            elif not isinstance(child, dict):
                raise ConfigError(f"override {dotted!r}: {'.'.join(keys[: i + 1])} is a value, not a mapping")
            else:
                child = node[k] = dict(child)
            node = child
        if isinstance(node, list):
            raise ConfigError(f"override {dotted!r}: name a key inside the phase, e.g. {dotted}.total")
        if keys[-2:-1] == ["groups"] and value is not None and not isinstance(value, dict):
            value = {"count": value}  # `groups.generation: 200k` like the YAML shorthand
        if keys[0] == "sources" and keys[-1] == "path" and isinstance(value, str):
            value = str(storage.as_root(value, folder))
        if value is None:
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = value
    return data


def _list_index(items: list, key: str, dotted: str) -> int:
    names = [it.get("name") if isinstance(it, dict) else None for it in items]
    if key in names:
        return names.index(key)
    if key.isdigit() and int(key) < len(items):
        return int(key)
    raise ConfigError(
        f"override {dotted!r}: no phase {key!r}; name one of {', '.join(map(str, names))} "
        f"or a position 0-{len(items) - 1}"
    )


def _unknown(where: str, got: dict, allowed: set[str], problems: _Problems) -> None:
    for k in got:
        if k not in allowed:
            problems.append(f"{where}{k}: unknown key; allowed here: {', '.join(sorted(allowed))}")


def spec_from_dict(data: dict[str, Any], origin: str = "<spec>") -> MixtureSpec:
    """Check keys and types of a merged mapping and build the spec; every problem is reported."""
    p = _Problems()
    _unknown("", data, TOP_KEYS, p)
    seed = data.get("seed", 0)
    p.check(
        isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0,
        f"seed: expected an integer >= 0, got {seed!r}",
    )
    repetition = data.get("repetition", "error")
    p.check(repetition in ("error", "allow"), f"repetition: expected error or allow, got {repetition!r}")
    cache = data.get("cache")
    p.check(
        cache is None or (isinstance(cache, str) and cache != ""),
        f"cache: expected a token-cache fingerprint string, got {cache!r}",
    )
    heldout, heldout_by, heldout_near = data.get("heldout", 0.0), "id", False
    if isinstance(heldout, dict):  # the mapping form: grouped by image unless it says by: id
        _unknown("heldout.", heldout, {"fraction", "by", "near"}, p)
        heldout_by, heldout_near = heldout.get("by", "image"), heldout.get("near", False)
        p.check(heldout_by in HELDOUT_BY, f"heldout.by: expected one of {', '.join(HELDOUT_BY)}, got {heldout_by!r}")
        p.check(isinstance(heldout_near, bool), f"heldout.near: expected true or false, got {heldout_near!r}")
        heldout = heldout.get("fraction", 0.02)
    p.check(
        isinstance(heldout, int | float) and not isinstance(heldout, bool) and 0 <= heldout < 1,
        f"heldout: expected a fraction in [0, 1), e.g. 0.02 or {{fraction: 0.02}}, got {heldout!r}",
    )
    dedup = data.get("dedup")
    p.check(dedup in (None, "exact", "near"), f"dedup: expected exact or near (or leave it out), got {dedup!r}")
    total = _count(data.get("total"), "total", p)

    sources = []
    raw_sources = data.get("sources")
    if p.check(
        isinstance(raw_sources, dict) and raw_sources,
        "sources: expected a mapping of source name -> {path, group, kind}; the spec has none",
    ):
        for name, src in raw_sources.items():
            where = f"sources.{name}"
            if not p.check(isinstance(src, dict), f"{where}: expected a mapping with path and group, got {src!r}"):
                continue
            _unknown(f"{where}.", src, SOURCE_KEYS, p)
            for key in ("path", "group"):
                p.check(isinstance(src.get(key), str), f"{where}.{key}: required, a string; got {src.get(key)!r}")
            kind = src.get("kind")
            p.check(kind is None or isinstance(kind, str), f"{where}.kind: expected a kind name, got {kind!r}")
            try:
                if isinstance(src.get("path"), str) and isinstance(src.get("group"), str):
                    path = storage.as_root(src["path"])
                    sources.append(SourceSpec(name=str(name), path=path, group=src["group"], kind=kind))
            except ValueError as e:
                p.append(str(e))

    groups: tuple[GroupSpec, ...] = ()
    phases: list[PhaseSpec] = []
    if data.get("phases") is not None:
        raw_phases = data["phases"]
        p.check(
            data.get("groups") is None and data.get("total") is None,
            "groups: a spec with phases gives its amounts in each phase; remove the top-level groups/total",
        )
        if p.check(
            isinstance(raw_phases, list) and raw_phases,
            "phases: expected a list of phases, each {name, groups, total}",
        ):
            for i, ph in enumerate(raw_phases):
                where = f"phases.{ph.get('name', i) if isinstance(ph, dict) else i}"
                if not p.check(isinstance(ph, dict), f"{where}: expected a mapping with groups, got {ph!r}"):
                    continue
                _unknown(f"{where}.", ph, PHASE_KEYS, p)
                ptotal = _count(ph.get("total"), f"{where}.total", p)
                pgroups, absent = _parse_groups(ph.get("groups"), f"{where}.groups", p, zero_ok=True)
                try:
                    name = str(ph.get("name") or f"phase{i + 1}")
                    phases.append(PhaseSpec(name=name, groups=pgroups, total=ptotal, absent=absent))
                except ValueError as e:
                    p.append(str(e))
    else:
        groups, _ = _parse_groups(data.get("groups"), "groups", p, zero_ok=False)
    unit = data.get("unit", "samples")
    p.check(unit in UNITS, f"unit: expected one of {', '.join(UNITS)}, got {unit!r}")
    tokenizer = data.get("tokenizer")
    p.check(tokenizer is None or isinstance(tokenizer, str), f"tokenizer: expected a name or folder, got {tokenizer!r}")
    if p:
        raise ConfigError(f"invalid mixture spec {origin}:\n  - " + "\n  - ".join(p))
    return MixtureSpec(
        sources=tuple(sources),
        groups=groups,
        phases=tuple(phases),
        unit=unit,
        tokenizer=tokenizer,
        seed=seed,
        repetition=repetition,
        cache=cache,
        total=total,
        heldout=float(heldout) if isinstance(heldout, int | float) else 0.0,
        heldout_by=heldout_by if heldout_by in HELDOUT_BY else "id",
        heldout_near=heldout_near is True,
        dedup=dedup if dedup in ("exact", "near") else None,
        origin=origin,
    )


def _count(value: Any, where: str, p: _Problems) -> int | None:
    if value is None:
        return None
    try:
        return parse_count(value, where)
    except ValueError as e:
        p.append(str(e))
        return None


def _parse_groups(
    raw_groups: Any, where_groups: str, p: _Problems, zero_ok: bool
) -> tuple[tuple[GroupSpec, ...], tuple[str, ...]]:
    """Group entries, and (in a phase: `zero_ok`) the groups named with an amount of 0, which the
    phase draws none of."""
    groups, absent = [], []
    if not p.check(
        isinstance(raw_groups, dict) and raw_groups,
        f"{where_groups}: expected a mapping of group name -> count (or {{count|weight, split}}); there is none",
    ):
        return (), ()
    for name, grp in raw_groups.items():
        where = f"{where_groups}.{name}"
        if not p.check(isinstance(grp, dict), f"{where}: expected a count or a mapping, got {grp!r}"):
            continue
        _unknown(f"{where}.", grp, GROUP_KEYS, p)
        amounts = [grp.get(k) for k in ("count", "weight") if grp.get(k) is not None]
        if zero_ok and amounts == [0]:
            absent.append(str(name))
            continue
        kw: dict[str, Any] = {"name": str(name)}
        try:
            if grp.get("count") is not None:
                kw["count"] = parse_count(grp["count"], f"{where}.count")
            if grp.get("weight") is not None:
                w = grp["weight"]
                if isinstance(w, bool) or not isinstance(w, int | float):
                    raise ConfigError(f"{where}.weight: expected a number > 0, got {w!r}")
                kw["weight"] = float(w)
            split = grp.get("split", "proportional")
            if isinstance(split, dict):
                shares = []
                for src, w in split.items():
                    if isinstance(w, bool) or not isinstance(w, int | float):
                        raise ConfigError(f"{where}.split.{src}: expected a share > 0, got {w!r}")
                    shares.append((str(src), float(w)))
                kw["split"], kw["shares"] = "explicit", tuple(shares)
            elif split == "explicit":
                raise ConfigError(
                    f"{where}.split: explicit means a mapping {{source: share}}, e.g. split: {{vqa: 3, captions: 1}}"
                )
            else:
                kw["split"] = split
            group = GroupSpec(**kw)
        except ValueError as e:
            msg = str(e)
            if msg.startswith(f"groups.{name}") and where != f"groups.{name}":  # GroupSpec's top-level path
                msg = where + msg[len(f"groups.{name}") :]
            p.append(msg)
            continue
        groups.append(group)
    return tuple(groups), tuple(absent)


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> MixtureSpec:
    """Load, merge includes, apply dotted overrides, validate. Raises ValueError naming each bad field."""
    path = Path(path)
    data = load_raw(path)
    if overrides:
        data = apply_overrides(data, overrides, path.resolve().parent)
    return spec_from_dict(data, origin=str(path))
