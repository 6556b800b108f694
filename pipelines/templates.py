"""Prompt templates for samples whose text is not in the raw data (generation, video, editing).

All templates live in one readable YAML file, `pipelines/templates/generation.yaml`; a user
passes their own with `--templates`. A sample's variant is picked by a hash of
(seed, sample key), not by a random generator, so the choice is the same on any worker, in
any order, on every re-run, and changes only with the seed or the file. The file's sha256
goes into the ingest config, so resuming with other templates is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import string
from pathlib import Path
from typing import Any

import yaml

from vpit.errors import ConfigError

__all__ = ["DEFAULT_TEMPLATES", "GROUPS", "Templates", "TemplateGroup", "load_templates", "pick_index"]

DEFAULT_TEMPLATES = Path(__file__).parent / "templates" / "generation.yaml"

# group -> the placeholders its user templates must use (each exactly once, no others).
GROUPS = {"generation": ("caption",), "video_prediction": (), "editing": ("instruction",)}


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TemplateGroup:
    user: tuple[str, ...]
    """User-turn variants; one is picked per sample."""
    assistant: str
    """Assistant text that precedes the image target(s)."""


def pick_index(seed: int, key: str, n: int) -> int:
    """A stable choice in [0, n) from (seed, key): sha256, so no platform or hash-seed dependence."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % n


@dataclasses.dataclass(frozen=True, slots=True)
class Templates:
    groups: dict[str, TemplateGroup]
    sha256: str
    path: str

    def user(self, group: str, key: str, seed: int, **fields: str) -> str:
        """The user text for the sample with this key, placeholders filled from `fields`."""
        variants = self.groups[group].user
        # str.format parses only the template, so braces inside a caption are kept as written.
        return variants[pick_index(seed, key, len(variants))].format(**fields)

    def assistant(self, group: str) -> str:
        return self.groups[group].assistant


def _placeholders(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def _group(path: Path, name: str, raw: Any) -> TemplateGroup:
    where = f"{path}: {name}"
    if not isinstance(raw, dict) or set(raw) != {"user", "assistant"}:
        got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise ConfigError(f"{where}: expected a mapping with keys 'user' and 'assistant', got {got}")
    user, assistant = raw["user"], raw["assistant"]
    if not isinstance(user, list) or not user or not all(isinstance(u, str) and u.strip() for u in user):
        raise ConfigError(f"{where}.user: expected a non-empty list of non-empty strings")
    if not isinstance(assistant, str) or not assistant.strip():
        raise ConfigError(f"{where}.assistant: expected a non-empty string")
    need = GROUPS[name]
    for i, u in enumerate(user):
        try:
            names = _placeholders(u)
        except ValueError as e:
            raise ConfigError(f"{where}.user[{i}] = {u!r}: {e} (write literal braces as {{{{ and }}}})") from None
        if sorted(names) != sorted(need):
            want = ", ".join("{" + n + "}" for n in need) or "no placeholder"
            raise ConfigError(f"{where}.user[{i}] = {u!r}: must use exactly {want}, found {names}")
    if _placeholders(assistant):
        raise ConfigError(f"{where}.assistant: must not hold placeholders, got {assistant!r}")
    return TemplateGroup(user=tuple(user), assistant=assistant.strip())


def load_templates(path: str | Path | None = None) -> Templates:
    """Load and validate a templates file (the built-in one when `path` is None or empty)."""
    path = Path(path) if path else DEFAULT_TEMPLATES
    if not path.is_file():
        raise ConfigError(f"templates: {str(path)!r} is not a file")
    data = path.read_bytes()
    try:
        raw = yaml.safe_load(data)
    except yaml.YAMLError as e:
        raise ConfigError(f"templates: {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"templates: {path} must hold a mapping of groups {sorted(GROUPS)}")
    unknown = sorted(set(raw) - set(GROUPS))
    missing = sorted(set(GROUPS) - set(raw))
    if unknown or missing:
        raise ConfigError(
            f"templates: {path}: unknown groups {unknown}, missing groups {missing}; expected exactly {sorted(GROUPS)}"
        )
    groups = {name: _group(path, name, raw[name]) for name in GROUPS}
    return Templates(groups=groups, sha256=hashlib.sha256(data).hexdigest(), path=str(path))
