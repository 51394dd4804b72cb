"""Bad command lines for every flag of every sparsetx command, found from the parser itself.

Each flag's checker (its argparse ``type`` or ``choices``) picks the pool of values it must refuse;
each case is a valid command line with one flag set to one such value. Shared by
tests/test_cli_errors.py and scripts/fuzz_cli.py (which runs them all and prints counts).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from sparsetx import cli

POOLS = {
    cli.positive_int: ["0", "-1", "1.5", "x", "", "1e3", "nan"],
    cli.nonneg_int: ["-1", "-100", "0.5", "x", ""],
    cli.positive_float: ["0", "-1e-3", "nan", "inf", "x", ""],
    cli.ratio: ["0", "1.5", "-1", "nan", "inf", "x", "", "1.0000001"],
    cli.probability: ["-0.1", "2", "nan", "x", ""],
    cli.pattern_arg: ["3:2", "0:4", "a:b", "2:4:8", "1:1000", "4:4", "", ":", "2:", "-1:4"],
    cli.series_arg: ["2:8,4:8", "4:8,x", "", ",", "3:2"],
    cli.pattern_or_dense: ["3:2", "sparse", ""],
    cli.regex_arg: ["(", "[a-", "*", "(?P<"],
    cli.layer_arg: ["query", "=1:8", "([=1:8", "query=3:2", "query=", "query=a:b"],
    cli.model_arg: ["/no/such/model", "/tmp", ""],
    cli.prompt_arg: ["", "   ", "\n", "caf\udce9"],
    cli.existing_file: ["/no/such/file.yaml", "/tmp"],
}
LIST_POOL = ["1,,2", ",", "", "x,y"]
CHOICE_POOL = ["x", "", "GPU", "Sta"]
REQUIRED = {"--prompt": "hi", "--model": "minilm", "folder": "minilm"}


def _subparsers(parser: argparse.ArgumentParser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                has_sub = any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)
                if has_sub:
                    yield from _subparsers(sub, prefix + (name,))
                else:
                    yield prefix + (name,), sub


def _pool(action, tmp: Path) -> list[str]:
    check = action.type
    if check in POOLS:
        return POOLS[check]
    if check is cli.out_arg:
        f = tmp / "a-file"
        f.write_text("x")
        return [str(f), str(f / "below"), ""]
    if check is cli.out_file:
        return [str(tmp), str(tmp / "a-file" / "below.json")]
    if getattr(check, "__qualname__", "").startswith("listed"):
        item = check.__closure__[0].cell_contents
        return LIST_POOL + [f"{v}" for v in POOLS.get(item, [])[:3] if v]
    if action.choices:
        return CHOICE_POOL
    return []


def cases(tmp: Path) -> list[tuple[list[str], str]]:
    """(argv, the flag its error must name) for every refusable flag value."""
    out = []
    (tmp / "a-file").write_text("x")
    for path, sub in _subparsers(cli.build_parser()):
        required = {}   # flag (or positional dest) -> a valid value
        for action in sub._actions:
            if action.required or not action.option_strings:
                name = action.option_strings[0] if action.option_strings else action.dest
                required[name] = REQUIRED.get(name, str(tmp / "out"))
        positional = [a.dest for a in sub._actions if not a.option_strings and not isinstance(a, argparse._HelpAction)]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            name = action.option_strings[0] if action.option_strings else action.dest
            for bad in _pool(action, tmp):
                values = {**required, name: bad}
                argv = [*path, *(values[p] for p in positional)]
                for flag, value in values.items():
                    if flag not in positional:
                        argv += [flag, value]
                out.append((argv, name))
    return out


class Accepted(Exception):
    """A bad value got past the parser into the command."""


def run_case(argv: list[str]) -> tuple[int | None, str]:
    """(exit status, stderr) of ``sparsetx argv`` with every command replaced by a stub that raises
    :class:`Accepted`, so a value that slips through never starts real work."""
    import contextlib
    import io

    from unittest import mock

    real = cli.build_parser

    def stubbed():
        parser = real()
        for _, sub in _subparsers(parser):
            sub.set_defaults(fn=_accept)
        return parser

    err = io.StringIO()
    with mock.patch.object(cli, "build_parser", stubbed), contextlib.redirect_stderr(err):  # errors: a stderr Console
        code = cli.main(argv)
    return code, err.getvalue()


def _accept(args):
    raise Accepted(str(vars(args)))
