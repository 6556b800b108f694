"""`vpit`: one entry point, a thin subcommand per stage, flags made from the config dataclasses.

Each product declares its commands next to its code (`vpit.pipelines.commands`, ...): the
frozen dataclasses that configure it and the function that runs it. Here every such command
gets the same convention: `--config FILE.yaml`, dotted `--set key=value` overrides, and one
flag per config field, whose help and default come from the dataclass (`vpit.config`), so
no default is written twice. Only the chosen command's module is imported.

A `VpitError` (a user mistake) is printed as one message without a traceback, exit code 2;
every other exception is a bug and keeps its traceback. Only `main` exits.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib
import os
import signal
import sys
import typing
from typing import Any, Literal

from vpit.config import CliValue, Command, Group, field_docs, load, unwrap_optional
from vpit.errors import Terminated

__all__ = ["COMMANDS", "build_parser", "main"]

# name -> (module:attribute of its Command or Group, one-line summary for `vpit --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "ingest": ("vpit.pipelines.commands:ingest", "raw source -> instruction shards (Ray Data job)"),
    "precompute": ("vpit.pipelines.commands:precompute", "images -> cached frozen-encoder visual tokens (Ray job)"),
    "inspect": ("vpit.pipelines.commands:inspect", "print a dataset's manifest summary and render samples"),
    "verify": (
        "vpit.pipelines.commands:verify",
        "check every shard against the manifest and every index against its tar",
    ),
    "dedup": ("vpit.pipelines.commands:dedup", "exact and near duplicate images within and across datasets"),
    "mix": ("vpit.mixtures.commands:mix", "plan and inspect mixture specs (exact counts, per-batch ratios)"),
    "train": ("vpit.train.commands:train", "train a VPiT model on a mixture with DeepSpeed ZeRO-3"),
    "eval": ("vpit.train.commands:evaluate", "evaluate a run on its mixture's held-out split"),
    "export": ("vpit.train.commands:export", "training checkpoint -> Hugging Face folder (safetensors)"),
    "generate": ("vpit.train.commands:generate", "generate text and visual tokens (.npy) from a trained model"),
    "grid": ("vpit.grid.commands:grid", "mixture ablation grids: plan, run on Ray, report"),
    "decoder": ("vpit.decoder.commands:decoder", "diffusion decoder: train on a token cache, decode tokens to PNGs"),
    "demo": ("vpit.demo.commands:demo", "run the whole pipeline on generated shapes-world data"),
}


def _metavar(tp: Any) -> str | None:
    tp = unwrap_optional(tp)[0]
    if typing.get_origin(tp) is Literal:
        return "{" + ",".join(map(str, typing.get_args(tp))) + "}"
    if typing.get_origin(tp) in (tuple, dict, list):
        return "YAML"
    return {int: "INT", float: "FLOAT"}.get(tp, "TEXT" if tp is str else None)


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return "" if f.default is None else f" (default: {f.default})"
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return "" if dataclasses.is_dataclass(value) or not value else f" (default: {value})"
    return " (required)"


def _add_fields(parser: argparse.ArgumentParser, cls: type, cmd: Command, prefix: str, dests: list[str]) -> None:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        dest, tp = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(unwrap_optional(tp)[0]):
            _add_fields(parser, unwrap_optional(tp)[0], cmd, dest + ".", dests)
            continue
        text = (docs.get(f.name, "") + _default_text(f)).replace("%", "%%")
        dests.append(dest)
        if dest in cmd.positional:
            many = typing.get_origin(unwrap_optional(tp)[0]) in (list, tuple)  # e.g. vpit dedup DATASET...
            parser.add_argument(
                dest,
                nargs="*" if many else "?",
                type=str if many else CliValue,
                default=argparse.SUPPRESS,
                help=text,
                metavar=f.name.upper(),
            )
            continue
        flags = (["-" + dest] if len(dest) == 1 else []) + ["--" + dest.replace("_", "-")]
        flags += [cmd.short[dest]] if dest in cmd.short else []
        if tp is bool:
            parser.add_argument(
                *flags, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text
            )
        else:
            parser.add_argument(
                *flags,
                dest=dest,
                type=CliValue,
                default=argparse.SUPPRESS,
                help=text,
                metavar="PATH" if "path" in f.metadata else _metavar(tp),
            )


def _add_command(parser: argparse.ArgumentParser, cmd: Command) -> None:
    parser.description = cmd.description or cmd.summary
    dests: list[str] = []
    if cmd.config_arg:
        parser.add_argument(
            "config_file",
            nargs="?",
            metavar=cmd.config_arg,
            default=None,
            help="the YAML config (the same as --config)",
        )
    parser.add_argument(
        "--config",
        metavar="FILE.yaml",
        default=None,
        help="YAML with any of the options below (nested keys as in --set); "
        "relative paths in it resolve against its folder",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="sets",
        help=f"override {'a key of ' + cmd.set_into if cmd.set_into else 'an option'} by its dotted "
        "path, the value read as YAML (e.g. --set data.max_len=512); repeatable, applied after --config",
    )
    for name, (text, _) in cmd.presets.items():
        parser.add_argument(f"--{name}", action="store_true", dest=f"preset:{name}", help=text)
    parser.add_argument(
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the third-party warnings and logs vpit silences",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed's launcher
    for cls in cmd.configs:
        _add_fields(parser, cls, cmd, "", dests)
    parser.set_defaults(_command=cmd, _dests=dests)


def _resolve(target: str) -> Command | Group:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def build_parser(name: str | None = None) -> argparse.ArgumentParser:
    """The parser: all command names, and the full options of command `name` only."""
    parser = argparse.ArgumentParser(
        prog="vpit",
        description="vpit: the data side of Visual-Predictive Instruction Tuning (MetaMorph). "
        "Ingest sources into instruction shards, precompute visual tokens, mix, train, run grids. "
        "`vpit COMMAND --help` shows a command's options.",
    )
    parser.add_argument("--verbose", action="store_true", help="show the third-party warnings and logs vpit silences")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cname, (target, summary) in COMMANDS.items():
        p = sub.add_parser(cname, help=summary, description=summary)
        if cname != name:
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
            continue
        node = _resolve(target)
        if isinstance(node, Command):
            _add_command(p, node)
        else:
            p.description = node.description or node.summary
            actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
            for aname, cmd in node.commands.items():
                _add_command(actions.add_parser(aname, help=cmd.summary), cmd)
    return parser


def configs_from_args(args: argparse.Namespace) -> tuple[Any, ...]:
    """The command's config instances from --config, presets, --set and flags."""
    from vpit.errors import ConfigError

    cmd: Command = args._command
    pairs = []
    for item in args.sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        pairs.append((key.strip(), CliValue(value)))
    sets: list[tuple[str, Any]] = [(cmd.set_into, dict(pairs))] if cmd.set_into and pairs else pairs
    sets += [(d, getattr(args, d)) for d in args._dests if hasattr(args, d)]
    config = getattr(args, "config_file", None)
    if config and args.config:
        raise ConfigError(f"give the config once: {config} or --config {args.config}")
    base: dict[str, Any] = {}
    for name, (_, values) in cmd.presets.items():
        if getattr(args, f"preset:{name}"):
            base.update(values)
    return load(cmd.configs, config=config or args.config, base=base, sets=sets)


def main(argv: list[str] | None = None) -> int:
    from vpit.common import disk_full, quiet
    from vpit.errors import VpitError

    argv = list(sys.argv[1:] if argv is None else argv)
    name = next((a for a in argv if not a.startswith("-")), None)
    # SIGTERM (a scheduler's or `kill`'s) ends the command as Ctrl-C does: cleanly, with one line;
    # the trainer installs its own handler while it trains (checkpoint at the next step, exit 0).
    signal.signal(signal.SIGTERM, _terminate)
    if os.environ.get("VPIT_VERBOSE") != "1" and "--verbose" not in argv:
        # Ray's C++ failure handler would print a stack for SIGTERM; it reads this when ray is imported
        os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    try:
        args = build_parser(name if name in COMMANDS else None).parse_args(argv)  # imports the command
    except (KeyboardInterrupt, Terminated) as e:
        print(f"vpit {name or ''}: stopped while starting; nothing was done", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    verbose = bool(getattr(args, "verbose", False)) or os.environ.get("VPIT_VERBOSE") == "1"
    quiet(not verbose)
    label = " ".join(x for x in (args.command, getattr(args, "action", None)) if x)
    configs: tuple = ()
    try:
        configs = configs_from_args(args)
        args._command.run(*configs)
    except VpitError as e:
        _end_bars()
        print(f"vpit {label}: error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as e:
        code = 143 if isinstance(e, Terminated) else 130
        what = "terminated (SIGTERM)" if code == 143 else "interrupted"
        _end_bars()
        print(f"vpit {label}: {what}; re-run the same command to resume", file=sys.stderr)
        return code
    except Exception as e:
        out = _output_of(args, configs)
        env = environment_error_in(e)
        if env is None and out and disk_full(out):  # e.g. torch.save's "unexpected pos" when the disk fills
            first = (str(e).strip().splitlines() or [""])[0][:120]
            env = OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({type(e).__name__}: {first})")
        if env is None:
            raise  # a bug: its traceback shows
        _end_bars()
        print(f"vpit {label}: error: {describe_environment_error(env, out)}", file=sys.stderr)
        return 2
    finally:  # the work is over: a late SIGTERM (during Ray's exit) ends the process without a traceback
        signal.signal(signal.SIGTERM, _exit_now)
    return 0


def _end_bars() -> None:
    """Close progress bars a failing stage left open, so our line starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _output_of(args: argparse.Namespace, configs: tuple) -> str | None:
    """The folder a command writes: its --output/--output-dir/dataset flag, or the config's."""
    names = ("output", "output_dir", "dataset")
    for source in (args, *configs):
        for n in names:
            value = getattr(source, n, None)
            if isinstance(value, str | os.PathLike) and str(value):
                return str(value)
    return None


def _exit_now(signum, frame) -> None:
    os._exit(143)  # a handler of our own, not SIG_IGN: an ignored signal is inherited by later children


def _terminate(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the clean-up that follows is not interrupted
    raise Terminated()


_ENV_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def environment_error_in(exc: BaseException) -> OSError | None:
    """A full disk, a read-only or forbidden folder anywhere in the exception's chain (also inside a
    Ray task's wrapped error): the machine's state, not a bug, so it gets one line, not a traceback."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _ENV_ERRNOS:
            return e
        todo += [getattr(e, "cause", None), e.__cause__]  # not __context__: a bug raised while handling one
    return None


def describe_environment_error(e: OSError, output: str | None = None) -> str:
    """One line: what the system said, where, and what to do. A file name that Ray's re-raise
    replaced by its own message is not shown; the command's output folder is named instead."""
    named = isinstance(e.filename, str) and "\n" not in e.filename and os.sep in e.filename
    path = e.filename if named else output
    where = (f" on {path}" if named else f" writing {path}") if path else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space (or raise the quota) and re-run the same command: the finished parts are kept"
    elif e.errno == errno.EROFS:
        fix = "the file system is read-only: choose another output, then re-run"
    else:
        fix = "it is not accessible to this user: fix its permissions (or choose another output), then re-run"
    return f"{os.strerror(e.errno)}{where}; {fix}"  # not e.strerror: Ray appends a traceback to it
