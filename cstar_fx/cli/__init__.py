"""The ``cstar-fx`` command line: one sub-command per module in this package.

Each sub-command module exposes ``register(subparsers) -> None``; it adds its parser and sets
``func`` (a callable taking the parsed namespace and returning an exit code).

Example:
    >>> main(["--version"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from .. import __version__
from ..errors import CstarError

__all__ = ["main", "build_parser", "UsageError", "Parser"]

SUBCOMMANDS = ("demo", "plan", "compress", "export_cmd", "bench_cmd")


class UsageError(CstarError):
    """A bad option or input; the CLI prints the message on one line and exits with code 2.

    ``prog`` (optional) is the command the message is about, e.g. ``"cstar-fx compress"``.

    Example:
        >>> str(UsageError("--ratio must be > 1"))
        '--ratio must be > 1'
    """

    def __init__(self, message: str, prog: str | None = None) -> None:
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors raise :class:`UsageError` instead of printing usage and exiting,
    so :func:`main` reports every user mistake the same way (one line, exit code 2) and a config
    file can be parsed with the same parser as the command line.

    Example:
        >>> p = Parser(prog="cstar-fx x"); _ = p.add_argument("--n", type=int)
        >>> try:
        ...     p.parse_args(["--n", "two"])
        ... except UsageError as exc:
        ...     print(exc.prog, "|", exc)
        cstar-fx x | argument --n: invalid int value: 'two'
    """

    def error(self, message: str) -> NoReturn:  # noqa: D102 - argparse's hook
        raise UsageError(message, prog=self.prog)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available sub-command.

    Example:
        >>> build_parser().prog
        'cstar-fx'
    """
    parser = Parser(
        prog="cstar-fx", description="CSTAR: compact, structured and adversarially robust networks via torch.fx",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"cstar-fx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # sub-command not built yet
            raise
        module.register(sub)
    return parser


def _sub_names(parser: argparse.ArgumentParser) -> list[str]:
    """The sub-command names of the top-level parser.

    Example:
        >>> "plan" in _sub_names(build_parser())
        True
    """
    return [name for a in parser._actions if isinstance(a, argparse._SubParsersAction) for name in a.choices]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 usage error, 1 failure).

    Example:
        >>> main(["plan", "--help"])  # doctest: +SKIP
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = None
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # named by the sub-command they were given to, whose --help lists what it takes
            where = f"cstar-fx {args.command}" if getattr(args, "command", None) else "cstar-fx"
            raise UsageError(f"unrecognized arguments: {' '.join(extra)}", prog=where)
        args.argv = argv
        if not getattr(args, "func", None):
            parser.print_help()
            raise UsageError(f"give a command: {', '.join(_sub_names(parser))}", prog="cstar-fx")
        command = args.command
        return int(args.func(args) or 0)
    except UsageError as exc:
        prog = exc.prog or (f"cstar-fx {command}" if command else "cstar-fx")
        message = " ".join(str(exc).split())  # one line, whatever the message held
        print(f"{prog}: error: {message} (see {prog} --help)" if exc.prog and not command else
              f"{prog}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
