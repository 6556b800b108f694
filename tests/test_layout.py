"""Imports flow one way: pipelines -> model; mixtures -> pipelines; train -> mixtures, model;
infra (the CLI and demo) on top. Nothing below infra imports infra or train."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "pipelines": {"pipelines", "model"},
    "model": {"model"},
    "mixtures": {"mixtures", "pipelines"},
    "train": {"train", "mixtures", "model", "pipelines"},
}


def _imports(path: Path) -> set[str]:
    tops = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            tops |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            tops.add(node.module.split(".")[0])
    return tops


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_flow_one_way(package):
    ours = set(ALLOWED) | {"infra"}
    bad = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        wrong = (_imports(path) & ours) - ALLOWED[package]
        if wrong:
            bad[str(path.relative_to(ROOT))] = sorted(wrong)
    assert not bad, f"{package} must not import {bad}"
