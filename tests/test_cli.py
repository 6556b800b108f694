"""One config convention: flags, help and defaults come from the dataclasses; --config, --set and
flags are checked against them; user mistakes print one line, bugs keep their traceback."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from vpit import cli
from vpit.config import Command, Group, field_docs, load, path_field
from vpit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _leaf_commands():
    for name, (target, _) in cli.COMMANDS.items():
        node = cli._resolve(target)
        items = node.commands.items() if isinstance(node, Group) else [(None, node)]
        for action, cmd in items:
            yield [name] + ([action] if action else []), cmd


@pytest.mark.parametrize("argv,cmd", list(_leaf_commands()), ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_every_field_is_a_flag_with_its_docstring_and_default(argv, cmd, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "500")  # argparse wraps help text at hyphens otherwise
    with pytest.raises(SystemExit):
        cli.main([*argv, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for cls in cmd.configs:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.type) or f.default_factory is not dataclasses.MISSING:
                continue  # nested configs: their own fields are the flags
            assert f.name in docs, f"{cls.__name__}.{f.name} has no docstring"
            flag = (
                f.name.upper()
                if f.name in cmd.positional
                else ("--" if len(f.name) > 1 else "-") + f.name.replace("_", "-")
            )
            assert flag in text, f"{' '.join(argv)}: no {flag}"
            assert " ".join(docs[f.name].split()) in text
            if f.default not in (None, dataclasses.MISSING):
                assert f"(default: {f.default})" in text, f"{flag}: default not shown"


def test_no_command_writes_a_flag_or_a_default_by_hand():
    """add_argument is called in vpit/cli.py only, and only for the shared options."""
    calls = {}
    for path in sorted(ROOT.glob("*/*.py")):
        if ".venv" in path.parts or path.parts[-2] in ("tests", "bench"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        n = sum(isinstance(c, ast.Call) and getattr(c.func, "attr", "") == "add_argument" for c in ast.walk(tree))
        if n:
            calls[path.relative_to(ROOT).as_posix()] = n
    assert set(calls) == {"vpit/cli.py"}, calls
    tree = ast.parse((ROOT / "vpit" / "cli.py").read_text())
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and getattr(call.func, "attr", "") == "add_argument":
            for kw in call.keywords:
                if kw.arg == "default":  # only "not given" markers, never a value
                    assert ast.unparse(kw.value) in ("argparse.SUPPRESS", "None", "[]"), ast.unparse(call)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class _Inner:
    width: int = 4
    """a number."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class _Options:
    data: str = path_field()
    """a path."""
    steps: int = 10
    """steps."""
    name: str = "x"
    """a name."""
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    """nested."""


def test_precedence_preset_then_config_then_set_then_flag_and_paths_resolve_where_written(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    cfg = tmp_path / "conf" / "c.yaml"
    cfg.write_text("data: shards\nsteps: 20\ninner: {width: 6}\n")
    monkeypatch.chdir(tmp_path)
    (opts,) = load((_Options,), config=cfg, base={"steps": 5, "name": "preset"})
    assert (opts.steps, opts.name, opts.inner.width) == (20, "preset", 6)
    assert opts.data == str(tmp_path / "conf" / "shards")  # against the YAML's folder
    seen = []

    def run(o):
        seen.append(o)

    cmd = Command(summary="t", run=run, configs=(_Options,), positional=("data",))
    monkeypatch.setitem(cli.COMMANDS, "t", ("tests.test_cli:_T", "t"))
    monkeypatch.setattr("tests.test_cli._T", cmd, raising=False)
    assert (
        cli.main(
            [
                "t",
                "here",
                "--config",
                str(cfg),
                "--set",
                "steps=30",
                "--set",
                "inner.width=8",
                "--steps",
                "40",
                "--name",
                "007",
            ]
        )
        == 0
    )
    (o,) = seen
    assert (o.steps, o.inner.width, o.name) == (40, 8, "007")  # a flag beats --set; text stays text
    assert o.data == str(tmp_path / "here")  # a positional resolves against the working directory


def test_mistakes_name_the_key_and_are_reported_together():
    with pytest.raises(ConfigError, match=r"(?s)steps: expected int, got 'many'.*inner: unknown key\(s\) widht"):
        load((_Options,), sets=[("data", "x"), ("steps", "many"), ("inner.widht", 3)])
    with pytest.raises(ConfigError, match=r"data: required \(give it in --config"):
        load((_Options,))
    with pytest.raises(ConfigError, match=r"stepz: unknown key \(--set\); known: data, inner, name, steps"):
        load((_Options,), sets=[("stepz", 1)])


def test_a_user_mistake_is_one_line_and_a_bug_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    def mistake(o):
        raise ConfigError("steps: expected >= 1, got 0; raise it")

    def bug(o):
        raise KeyError("oops")

    for name, fn in (("mistake", mistake), ("bug", bug)):
        monkeypatch.setitem(cli.COMMANDS, name, (f"tests.test_cli:_{name}", name))
        monkeypatch.setattr(
            f"tests.test_cli._{name}", Command(summary=name, run=fn, configs=(_Options,)), raising=False
        )
    assert cli.main(["mistake", "--data", "x"]) == 2
    assert capsys.readouterr().err == "vpit mistake: error: steps: expected >= 1, got 0; raise it\n"
    with pytest.raises(KeyError, match="oops"):  # not dressed as a user mistake
        cli.main(["bug", "--data", "x"])
    assert cli.main(["mistake", "--set", "nonsense"]) == 2
    assert "--set 'nonsense': expected KEY=VALUE" in capsys.readouterr().err


def _readme_commands() -> list[list[str]]:
    """Every `vpit ...` line in the README's code blocks (continuations joined), as argv."""
    import re
    import shlex

    out, blocks = [], re.findall(r"^\s*```\w*\n(.*?)^\s*```", (ROOT / "README.md").read_text(), flags=re.S | re.M)
    for block in blocks:
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.strip().removeprefix("$ ")
            line = re.sub(r"^(RAY_ADDRESS|PIP_CONSTRAINT|OMP_NUM_THREADS)=\S+ ", "", line)
            if line.startswith("vpit ") and "─" not in line and line.count("vpit ") == 1:  # not the picture
                out.append(shlex.split(line.split(" #", 1)[0])[1:])
    return out


def test_every_vpit_command_in_the_readme_parses():
    commands = _readme_commands()
    assert len(commands) >= 15
    for argv in commands:
        args = cli.build_parser(argv[0]).parse_args(argv)
        assert args._command is not None, argv
