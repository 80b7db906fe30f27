"""Argument types and config files for the sub-commands: one parser validates flags and config values alike.

A value from ``--config run/config.json`` is turned back into the tokens a user would type
(``"lr": 0.1`` becomes ``--lr=0.1``) and parsed by the sub-command's own parser, so a bad config
value fails with the same one-line error as the flag would, and a new option added with
``add_argument(..., type=...)`` is validated in config files with no extra code.

Example:
    >>> import argparse
    >>> p = argparse.ArgumentParser(prog="demo"); _ = p.add_argument("--rho", type=number(above=0), default=1.0)
    >>> p.parse_args(["--rho", "0.5"]).rho
    0.5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from . import UsageError

__all__ = ["number", "integer", "fraction", "explicit_dests", "config_values", "check_output", "write_output",
           "unwritable", "check_providers", "CONFIG_FORMAT", "MAX_SEED"]

CONFIG_FORMAT = "cstar-fx/config/1"
"""The ``format`` field of the ``config.json`` a run writes."""
MAX_SEED = 2**32 - 1
"""The largest ``--seed``: NumPy and scikit-learn take 32-bit seeds."""


def _bound_text(above: float | None, at_least: float | None, below: float | None, at_most: float | None) -> str:
    parts = [f"> {above:g}" if above is not None else "", f">= {at_least:g}" if at_least is not None else "",
             f"< {below:g}" if below is not None else "", f"<= {at_most:g}" if at_most is not None else ""]
    return " and ".join(p for p in parts if p)


def number(*, above: float | None = None, at_least: float | None = None, below: float | None = None,
           at_most: float | None = None, fractions: bool = False) -> Callable[[str], float]:
    """An argparse ``type=``: a finite number within the bounds (NaN and Inf are refused).

    ``fractions=True`` also accepts ``8/255``.

    Example:
        >>> number(above=0)("0.1")
        0.1
        >>> number(above=0)("0")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: must be a finite number > 0, got '0'
    """
    bounds = _bound_text(above, at_least, below, at_most)
    what = f"a finite number {bounds}".strip() + (" (a fraction like 8/255 is fine)" if fractions else "")

    def parse(text: str) -> float:
        try:
            value = float(Fraction(text.strip())) if fractions and "/" in text else float(text)
        except (ValueError, ZeroDivisionError, TypeError):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if (not math.isfinite(value) or (above is not None and not value > above)
                or (at_least is not None and not value >= at_least) or (below is not None and not value < below)
                or (at_most is not None and not value <= at_most)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


def fraction(*, at_least: float = 0.0, below: float = 1.0) -> Callable[[str], float]:
    """An argparse ``type=`` for attack radii: a number or a fraction such as ``8/255``, in ``[at_least, below)``.

    Example:
        >>> round(fraction()("8/255"), 5)
        0.03137
    """
    return number(at_least=at_least, below=below, fractions=True)


def integer(*, at_least: int, at_most: int | None = None) -> Callable[[str], int]:
    """An argparse ``type=``: a whole number ``>= at_least`` (and ``<= at_most``; ``"2.5"`` and ``"1e3"`` are refused).

    Example:
        >>> integer(at_least=1)("4")
        4
        >>> integer(at_least=1)("0")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: must be an integer >= 1, got '0'
    """
    what = f"an integer >= {at_least}" + (f" and <= {at_most}" if at_most is not None else "")

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except (ValueError, TypeError, AttributeError):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < at_least or (at_most is not None and value > at_most):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = "integer"
    return parse


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}


def explicit_dests(parser: argparse.ArgumentParser, tokens: Sequence[str]) -> set[str]:
    """The option names (``dest``) that ``tokens`` set explicitly, however spelled (``--lr=1``, ``--l 1``).

    Example:
        >>> p = argparse.ArgumentParser(); _ = p.add_argument("--learning-rate", type=float, default=0.1)
        >>> explicit_dests(p, ["--learn", "0.2"]), explicit_dests(p, [])
        ({'learning_rate'}, set())
    """
    actions = list(_actions(parser).values())
    saved = [a.default for a in actions]
    saved_defaults = dict(parser._defaults)
    try:
        for a in actions:
            a.default = argparse.SUPPRESS
        parser._defaults.clear()
        namespace, _ = parser.parse_known_args(list(tokens))
    finally:
        for a, d in zip(actions, saved):
            a.default = d
        parser._defaults.update(saved_defaults)
    return set(vars(namespace))


def _tokens(action: argparse.Action, key: str, value: Any) -> list[str]:
    """The command-line tokens that set ``action`` to the config ``value`` (raises UsageError if none can)."""
    flag = action.option_strings[-1]
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UsageError(f"argument {flag}: expected true or false, got {json.dumps(value)}")
        return [flag] if value != action.default else []

    def text(v: Any) -> str:
        if isinstance(v, (dict, list)):
            raise UsageError(f"argument {flag}: expected a single value, got {json.dumps(v)}")
        return v if isinstance(v, str) else json.dumps(v)

    if action.nargs in ("+", "*"):
        values = value if isinstance(value, list) else [value]
        items = [text(v) for v in values]
        for item in items:  # a token such as "--overwrite" inside a list would be read as a flag
            if item.startswith("-") and not _is_number(item):
                raise UsageError(f"argument {flag}: value {item!r} starts with '-'")
        if not items and action.nargs == "+":
            raise UsageError(f"argument {flag}: expected at least one argument")
        return [flag, *items]
    if isinstance(value, list):
        raise UsageError(f"argument {flag}: expected one value, got a list {json.dumps(value)}")
    return [f"{flag}={text(value)}"]  # "=" so that a value starting with "-" stays a value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def config_values(parser: argparse.ArgumentParser, path: Path, *, skip: Iterable[str] = (),
                  not_options: Iterable[str] = ()) -> dict[str, Any]:
    """The options a run's ``config.json`` holds, each parsed by ``parser`` exactly as its flag would be.

    ``parser`` is a :class:`cstar_fx.cli.Parser` (its errors raise instead of exiting).
    ``skip``: options to leave out (those set on the command line, which win); ``not_options``: keys a
    config may hold that are not taken from it (such as ``out``). A ``null`` value means the option's
    default. Raises :class:`UsageError` (naming the file and the option) for an unreadable file, an
    unknown option or a value its flag would refuse.

    Example:
        >>> import tempfile
        >>> from cstar_fx.cli import Parser
        >>> p = Parser(prog="x"); _ = p.add_argument("--lr", type=number(above=0), default=1.0)
        >>> f = Path(tempfile.mkdtemp()) / "config.json"
        >>> _ = f.write_text('{"format": "cstar-fx/config/1", "options": {"lr": "0.5"}}')
        >>> config_values(p, f)
        {'lr': 0.5}
        >>> _ = f.write_text('{"format": "cstar-fx/config/1", "options": {"lr": 0}}')
        >>> config_values(p, f)
        Traceback (most recent call last):
        ...
        cstar_fx.cli.UsageError: --config ...config.json: argument --lr: must be a finite number > 0, got '0'
    """
    where = f"--config {path}"
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{where}: not a readable cstar-fx config.json ({exc}); pass the one a run wrote") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("options"), dict):
        raise UsageError(f"{where}: not a cstar-fx config.json (it needs an \"options\" object); "
                         "pass the one a run wrote")
    if saved.get("format", CONFIG_FORMAT) != CONFIG_FORMAT:
        raise UsageError(f"{where}: format {saved.get('format')!r} is not {CONFIG_FORMAT!r}")
    actions, skip, not_options = _actions(parser), set(skip), set(not_options)
    values: dict[str, Any] = {}
    for key, value in saved["options"].items():
        if key in not_options or key in skip:
            continue
        action = actions.get(key)
        if action is None:
            raise UsageError(f"{where}: unknown option {key!r}; remove it (see {parser.prog} --help)")
        if value is None:
            if action.default is not None:
                raise UsageError(f"{where}: argument {action.option_strings[-1]}: null is not a value; "
                                 "give a value or remove the option")
            values[key] = None
            continue
        try:
            tokens = _tokens(action, key, value)
            parsed = parser.parse_args(tokens) if tokens else None
        except UsageError as exc:
            raise UsageError(f"{where}: {exc}") from None
        values[key] = getattr(parsed, key) if parsed is not None else action.default
    return values


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def check_output(path: Path, flag: str, *, inputs: Mapping[str, Path | None] | None = None,
                 example: str = "out.json") -> None:
    """Refuse, before any work is done, an output file that could not be written or that would replace an input.

    ``inputs`` maps a description (``"the --plan file"``) to each path the command reads (or writes otherwise). Missing folders above
    ``path`` are fine (they are created when the file is written); the nearest existing one must take a
    new file. ``example`` is the file name suggested when ``path`` is a folder. Raises :class:`UsageError`
    naming the fix.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> check_output(folder / "new" / "plan.json", "--json")
        >>> check_output(folder, "--json")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        cstar_fx.cli.UsageError: --json ... is a folder; pass a file name, e.g. .../out.json
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; pass a file name, e.g. {path / example}")
    for what, other in (inputs or {}).items():
        if other is not None and _same_file(path, Path(other)):
            raise UsageError(f"{flag} {path} is also {what}; writing it would replace that file, so pass another "
                             f"{flag}")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"{flag} {path}: {folder} is a file, not a folder; pass another {flag}")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot write in {folder} ({exc.strerror or exc}); pass a writable "
                         f"{flag}") from None


def write_output(path: Path, text: str, flag: str) -> None:
    """Write ``text`` to ``path`` (creating missing folders above it); a failure is a one-line :class:`UsageError`.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "sub" / "x.md"
        >>> write_output(out, "# hi", "--markdown"); out.read_text()
        '# hi'
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as exc:
        raise unwritable(path, flag, exc) from None


def unwritable(path: Path, flag: str, exc: OSError) -> UsageError:
    """The one-line error for an output ``path`` (given by ``flag``) that could not be written.

    Example:
        >>> str(unwritable(Path("/x/m.onnx"), "--out", PermissionError(13, "Permission denied")))
        'cannot write --out /x/m.onnx: Permission denied; pass a writable --out'
    """
    return UsageError(f"cannot write {flag} {path}: {exc.strerror or exc}; pass a writable {flag}")


def check_providers(providers: Iterable[str]) -> None:
    """Refuse an onnxruntime provider name onnxruntime does not know (a typo) as a :class:`UsageError`; a known
    one that this machine cannot run is reported by the benchmark instead. Without onnxruntime nothing is checked.

    Example:
        >>> check_providers(["CPUExecutionProvider"])
    """
    try:
        import onnxruntime as ort
    except ImportError:
        return  # the benchmark says which extra to install
    known = ort.get_all_providers()
    for name in providers:
        if name not in known:
            near = [k for k in known if name.lower().replace("executionprovider", "") in k.lower()]
            raise UsageError(f"--providers: onnxruntime has no provider {name!r}; pass full names such as "
                             f"{', '.join(near[:2] or ['CUDAExecutionProvider', 'CPUExecutionProvider'])}")
