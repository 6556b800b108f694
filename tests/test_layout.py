"""The package layout: one installed name (`vpit`), imports that flow one way, everything the
code reads at run time inside the wheel."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> the vpit packages its modules may import ("vpit" = the root package's own modules:
# config, errors, common, shapes). The CLI (vpit/cli.py) and the demo sit on top of everything.
ALLOWED = {
    "vpit": {"vpit"},
    "model": {"vpit", "model"},
    "pipelines": {"vpit", "pipelines", "model"},
    "mixtures": {"vpit", "mixtures", "pipelines", "model"},  # model.tokenizer: amounts in tokens
    "train": {"vpit", "train", "mixtures", "model", "pipelines", "infra"},
    "decoder": {"vpit", "decoder", "train", "model", "pipelines", "infra"},
    "grid": {"vpit", "grid", "train", "mixtures"},
    "infra": {"vpit", "infra"},
}
STAGES = set(ALLOWED) | {"demo"}


def _our_imports(path: Path) -> set[str]:
    """The vpit packages a module imports, and any bare import of a stage name (always wrong)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module]
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
            else []
        )
        for name in names:
            parts = name.split(".")
            if parts[0] == "vpit":
                found.add(parts[1] if len(parts) > 1 and parts[1] in STAGES - {"vpit"} else "vpit")
            elif parts[0] in STAGES - {"vpit"}:
                found.add(f"bare:{parts[0]}")
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_flow_one_way(package):
    bad = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        if path.relative_to(ROOT).as_posix() in ("vpit/cli.py", "vpit/__main__.py"):
            continue  # the CLI dispatches to every stage
        wrong = _our_imports(path) - ALLOWED[package]
        if wrong:
            bad[str(path.relative_to(ROOT))] = sorted(wrong)
    assert not bad, f"{package} must not import {bad}"


def test_nothing_imports_a_stage_by_its_bare_name():
    bad = {}
    for path in sorted(ROOT.rglob("*.py")):
        if ".venv" in path.parts:
            continue
        wrong = {n for n in _our_imports(path) if n.startswith("bare:")}
        if wrong:
            bad[str(path.relative_to(ROOT))] = sorted(wrong)
    assert not bad, f"import vpit.<stage>, never the bare folder name: {bad}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"  # a copy: a wheel build leaves build/ in the tree it builds from
    skip = shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__", "demo-out", "bench-data")
    shutil.copytree(ROOT, src, ignore=skip)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (whl,) = out.glob("vpit-*.whl")
    return zipfile.ZipFile(whl)


def test_the_wheel_installs_exactly_one_top_level_name(wheel):
    names = wheel.namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"vpit"}
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert wheel.read(top_level).decode().split() == ["vpit"]


def test_the_wheel_holds_every_module_and_every_runtime_file(wheel):
    names = set(wheel.namelist())
    for folder, package in (("vpit", "vpit"), *((f, f"vpit/{f}") for f in sorted(STAGES - {"vpit"}))):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix in (".py", ".json", ".yaml", ".sh"):
                rel = f"{package}/{path.relative_to(ROOT / folder).as_posix()}"
                assert rel in names, f"{rel} is not in the wheel"
    for runtime in (
        "vpit/infra/deepspeed/zero3_cpu.json",
        "vpit/infra/deepspeed/zero3_gpu_bf16.json",
        "vpit/pipelines/templates/generation.yaml",
        "vpit/mixtures/examples/base.yaml",
    ):
        assert runtime in names
