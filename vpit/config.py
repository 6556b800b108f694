"""One config convention for every command: frozen dataclasses, filled from a YAML file,
then dotted `--set key=value` overrides, then flags, and validated once.

A command's options are one or more frozen dataclasses, each defined next to the code that
uses it. Every field has a one-line docstring under it (it becomes the flag's help) and its
default lives in the dataclass only: the CLI reads both from there (`vpit.cli`).

Our own small loader rather than jsonargparse or tyro: both would replace our validation
messages (the full key path, the bad value and the fix, every problem reported at once)
with their own, and neither resolves a relative path against the folder of the YAML that
holds it. What we need is small: nested frozen dataclasses of plain types.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from vpit.errors import ConfigError, InputError

__all__ = ["CliValue", "Command", "Group", "field_docs", "from_dict", "load", "path_field", "read_yaml", "set_dotted"]


class CliValue(str):
    """A value typed on the command line (a flag or --set): read as YAML unless the field is text."""


def path_field(default: Any = dataclasses.MISSING, *, keep: tuple[str, ...] = (), or_name: bool = False) -> Any:
    """A field holding a path: relative values resolve against the YAML file that gives them
    (or the working directory, for flags and --set). Values in `keep` are names, not paths;
    with `or_name` (a model id or a folder) a value that names no existing file stays as written."""
    return dataclasses.field(default=default, metadata={"path": tuple(keep), "or_name": or_name})


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass `cls`, first paragraph, one line."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (frozen app): help without docs
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split("\n\n")[0].split())
    return docs


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(T, True) for `T | None`, else (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _is_text(tp: Any) -> bool:
    tp, _ = unwrap_optional(tp)
    if typing.get_origin(tp) is Literal:
        return all(isinstance(a, str) for a in typing.get_args(tp))
    return tp in (str, Path)


def _text(value: CliValue) -> str | None:
    """A command-line value for a text field: YAML only for a quoted string or null, else as typed."""
    try:
        parsed = yaml.safe_load(value) if value.strip() else str(value)
    except yaml.YAMLError:
        return str(value)
    return parsed if parsed is None or isinstance(parsed, str) else str(value)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if isinstance(value, CliValue) and not _is_text(tp):
        try:
            value = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"{where}: {str(value)!r} is not a valid value") from None
    elif isinstance(value, CliValue):
        value = _text(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    inner, optional = unwrap_optional(tp)
    if optional:
        return None if value is None else _coerce(inner, value, where)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # e.g. int | str: the first type that takes it
        for a in args:
            try:
                return _coerce(a, value, where)
            except ConfigError:
                continue
        raise ConfigError(
            f"{where}: expected {' or '.join(getattr(a, '__name__', str(a)) for a in args)}, got {value!r}"
        )
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str):  # a comma-separated list on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner_types = args[:1] * len(value) if args[-1:] == (Ellipsis,) else args
        if len(inner_types) != len(value):
            raise ConfigError(f"{where}: expected {len(inner_types)} values, got {len(value)}")
        return tuple(_coerce(t, v, f"{where}[{i}]") for i, (t, v) in enumerate(zip(inner_types, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is Path and isinstance(value, str):
        return Path(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _key(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from plain values. Unknown keys, wrong types and missing required
    fields are collected and raised together, each with its full key path."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    problems = []
    unknown = sorted(set(data) - set(fields))
    if unknown:
        problems.append(
            f"{where or 'config'}: unknown key(s) {', '.join(map(str, unknown))}; known: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            try:
                kwargs[name] = _coerce(hints[name], data[name], _key(where, name))
            except ConfigError as e:
                problems.append(str(e))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(
                f"{_key(where, name)}: required (give it in --config, with --set {_key(where, name)}=..., or as a flag)"
            )
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else "invalid config:\n  - " + "\n  - ".join(problems))
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # a __post_init__ check: already names the field
        raise ConfigError(str(e)) from None


def resolve_paths(cls: type, data: Any, folder: Path) -> Any:
    """`data` with every relative path field of `cls` (and of nested dataclasses) made absolute
    against `folder`."""
    if not isinstance(data, Mapping):
        return data
    out = dict(data)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in out:
            continue
        value, tp = out[f.name], unwrap_optional(hints[f.name])[0]
        if isinstance(value, CliValue) and "path" in f.metadata:
            value = out[f.name] = _text(value)
        if "path" in f.metadata and "://" in str(value):  # a URL (s3://...): kept as written
            continue
        if "path" in f.metadata and isinstance(value, str | Path) and str(value) not in f.metadata["path"]:
            p = Path(value).expanduser()
            resolved = p if p.is_absolute() else (folder / p).resolve()
            if resolved.exists() or not f.metadata.get("or_name"):
                out[f.name] = str(resolved)
        elif "path" in f.metadata and isinstance(value, list | tuple):  # a list of paths
            out[f.name] = [str((folder / Path(v).expanduser()).resolve()) for v in value]
        elif dataclasses.is_dataclass(tp):
            out[f.name] = resolve_paths(tp, value, folder)
    return out


def read_yaml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML mapping from a file (safe_load: plain values only, no Python tags)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """data[a][b][c] = value for key "a.b.c", creating mappings on the way."""
    *parents, last = key.split(".")
    if not all(key.split(".")):
        raise ConfigError(f"--set {key}: empty key in dotted path")
    node = data
    for i, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parents[: i + 1])} is a value, not a mapping")
        node = child
    node[last] = value


def _owner(classes: tuple[type, ...], key: str) -> int | None:
    top = key.split(".")[0]
    for i, cls in enumerate(classes):
        if top in {f.name for f in dataclasses.fields(cls)}:
            return i
    return None


def load(
    classes: tuple[type, ...],
    *,
    config: str | Path | None = None,
    base: Mapping[str, Any] | None = None,
    sets: Iterable[tuple[str, Any]] = (),
    cwd: Path | None = None,
) -> tuple[Any, ...]:
    """Build one instance of each of `classes` from, in increasing priority: `base` (a preset),
    the YAML file `config`, and `sets` (dotted keys with values from --set or flags).

    The YAML is one flat mapping: each top-level key goes to the class that has that field.
    """
    cwd = cwd or Path.cwd()
    parts: list[dict[str, Any]] = [{} for _ in classes]
    problems = []

    def put(key: str, value: Any, folder: Path, origin: str) -> None:
        i = _owner(classes, key)
        if i is None:
            known = sorted({f.name for c in classes for f in dataclasses.fields(c)})
            problems.append(f"{key}: unknown key ({origin}); known: {', '.join(known)}")
            return
        nested: dict[str, Any] = {}
        set_dotted(nested, key, value)
        nested = resolve_paths(classes[i], nested, folder)
        _merge_into(parts[i], nested)

    for key, value in (base or {}).items():
        put(key, value, cwd, "preset")
    if config is not None:
        folder = Path(config).resolve().parent
        for key, value in read_yaml(config).items():
            put(str(key), value, folder, str(config))
    for key, value in sets:
        put(key, value, cwd, "--set")
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else "invalid config:\n  - " + "\n  - ".join(problems))
    return tuple(from_dict(cls, part) for cls, part in zip(classes, parts))


def _merge_into(into: dict[str, Any], over: dict[str, Any]) -> None:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge_into(into[k], v)
        else:
            into[k] = v


def to_plain(obj: Any) -> Any:
    """A config dataclass as plain YAML-able values (tuples as lists, paths as strings)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


@dataclasses.dataclass(frozen=True)
class Command:
    """One runnable command: `run(*configs)` with one instance of each class in `configs`."""

    summary: str
    run: Callable[..., Any]
    configs: tuple[type, ...] = ()
    description: str = ""
    positional: tuple[str, ...] = ()
    """Fields given as positional arguments (they may also come from --config)."""
    short: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Field -> a short flag, e.g. {"output": "-o"}."""
    presets: Mapping[str, tuple[str, Mapping[str, Any]]] = dataclasses.field(default_factory=dict)
    """Flag name -> (help, values applied under --config), e.g. `--quick`."""
    config_arg: str | None = None
    """Also take the --config file as a first positional argument of this name (`vpit train CONFIG`)."""
    set_into: str | None = None
    """A dict field that `--set KEY=VALUE` fills, KEY kept whole: the command's subject is a spec of
    its own (`vpit mix plan SPEC --set groups.generation.count=200k` overrides the spec)."""


@dataclasses.dataclass(frozen=True)
class Group:
    """A command with actions: `vpit ingest llava`, `vpit grid run`, ..."""

    summary: str
    commands: Mapping[str, Command]
    description: str = ""
