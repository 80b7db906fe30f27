"""Run folders: the only place ``cstar-fx compress`` writes, and the only files it ever deletes.

A run folder holds a marker file, ``.cstar-fx-run``, that lists every file the tool wrote there.
From it follow the rules the command keeps:

* a folder is written into only if it is new, empty, or a run folder (it has the marker);
* a run folder with the same options is *resumed*: what is done is kept, the rest is run;
* ``--overwrite`` builds the new run in ``.cstar-fx-next/`` inside the folder and replaces the old
  run's files only when the new run has finished (:meth:`RunFolder.finish`), so a failed or
  interrupted run leaves the previous one intact;
* only files listed in the marker are ever deleted or replaced; any other file (the user's) stays, and
  a run that would have to write over one refuses to start.

Example:
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "run"
    >>> folder = RunFolder.claim(out, {"lr": 0.1})
    >>> folder.write_text("results.json", "{}")
    >>> sorted(folder.files), folder.resumed
    (['config.json', 'results.json'], False)
    >>> RunFolder.claim(out, {"lr": 0.1}).resumed  # the same options: resume
    True
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..fileutil import atomic_path
from . import UsageError

__all__ = ["RunFolder", "MARKER", "STAGING"]

MARKER = ".cstar-fx-run"
"""The file that makes a folder a cstar-fx run folder; it lists the files the tool wrote there."""
STAGING = ".cstar-fx-next"
"""Where an ``--overwrite`` run is built before it replaces the previous run."""
_MARKER_FORMAT = "cstar-fx/run-folder/1"
_CONFIG_FORMAT = "cstar-fx/config/1"
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


def _json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, paths strings), for comparing options."""
    return json.loads(json.dumps(value, default=str))


def _read_marker(folder: Path) -> set[str] | None:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("format") != _MARKER_FORMAT or not isinstance(data.get("files"), list):
        return None
    return {f for f in data["files"] if isinstance(f, str) and ".." not in Path(f).parts and not Path(f).is_absolute()}


def _write_marker(folder: Path, files: Iterable[str]) -> None:
    with atomic_path(folder / MARKER) as tmp:
        tmp.write_text(json.dumps({"format": _MARKER_FORMAT, "files": sorted(files)}, indent=1) + "\n")
        os.chmod(tmp, _FILE_MODE)


def _remove_listed(folder: Path, files: Iterable[str]) -> None:
    """Delete the listed files, then the folders that this left empty; never anything else."""
    parents: set[Path] = set()
    for rel in files:
        path = folder / rel
        if path.is_file() or path.is_symlink():
            path.unlink()
        parents.update(p for p in (folder / rel).parents if folder in p.parents)
    for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        try:
            parent.rmdir()  # only succeeds when empty
        except OSError:
            pass


def _files_under(folder: Path, rel: str) -> set[str]:
    path = folder / rel
    if path.is_file():
        return {rel}
    return {p.relative_to(folder).as_posix() for p in path.rglob("*") if p.is_file()} if path.is_dir() else set()


def _options_diff(saved: dict[str, Any], wanted: dict[str, Any], ignore: Iterable[str]) -> list[str]:
    saved, wanted, ignore = _json(saved), _json(wanted), set(ignore)
    keys = sorted((set(saved) | set(wanted)) - ignore)
    return [f"{k}: {json.dumps(saved.get(k))} there, {json.dumps(wanted.get(k))} here"
            for k in keys if saved.get(k) != wanted.get(k)]


class RunFolder:
    """A run folder claimed for writing (see the module docstring for the rules).

    ``path`` is where this run writes (the folder itself, or its ``.cstar-fx-next/`` under
    ``--overwrite``); ``files`` the files the tool wrote there; ``resumed`` whether an earlier run
    with the same options was found and continues.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp())
        >>> _ = (out / "notes.txt").write_text("mine")
        >>> RunFolder.claim(out, {})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        cstar_fx.cli.UsageError: --out ... is not empty and is not a cstar-fx run folder (no .cstar-fx-run marker)...
    """

    def __init__(self, root: Path, path: Path, files: set[str], resumed: bool) -> None:
        self.root, self.path, self.files, self.resumed = root, path, files, resumed

    @property
    def staged(self) -> bool:
        """True when this run replaces a previous one on :meth:`finish` (``--overwrite``).

        Example:
            >>> import tempfile
            >>> RunFolder.claim(Path(tempfile.mkdtemp()) / "r", {}).staged
            False
        """
        return self.path != self.root

    @classmethod
    def claim(cls, out: Path, options: dict[str, Any], *, overwrite: bool = False, entries: Iterable[str] = (),
              ignore: Iterable[str] = ()) -> RunFolder:
        """Check that ``out`` may be written, and set it up: create it, resume it, or stage a replacement.

        ``options`` are the run's options (written to ``config.json``; a run folder is resumed only when
        they match, apart from the keys in ``ignore``). ``entries`` are the top-level names the run will
        write (files or folders): a file there that the tool did not write stops the run before it
        starts. Raises :class:`UsageError` naming the fix; nothing is deleted here.

        Example:
            >>> import tempfile
            >>> out = Path(tempfile.mkdtemp()) / "r"
            >>> _ = RunFolder.claim(out, {"lr": 0.1})
            >>> RunFolder.claim(out, {"lr": 0.2})  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            cstar_fx.cli.UsageError: run folder ... holds a run with other options (lr: 0.1 there, 0.2 here);...
            >>> RunFolder.claim(out, {"lr": 0.2}, overwrite=True).staged
            True
        """
        out, entries = Path(out), list(entries)
        try:
            if out.exists() and not out.is_dir():
                raise UsageError(f"--out {out} is a file; pass a folder")
            if not out.exists() or not any(out.iterdir()):
                return cls._fresh(out, out, options)
            listed = _read_marker(out)
            if listed is None:
                legacy = (out / "config.json").is_file() and _CONFIG_FORMAT in (out / "config.json").read_text()[:200]
                raise UsageError(
                    f"--out {out} is not empty and is not a cstar-fx run folder (no {MARKER} marker"
                    + (", it was written by an older cstar-fx" if legacy else "") + "); cstar-fx never deletes "
                    "files it did not write, so pass a new or empty --out")
            cls._refuse_foreign(out, listed, entries)
            if not overwrite:
                diff = _options_diff(cls._saved_options(out), options, ignore)
                if diff:
                    raise UsageError(f"run folder {out} holds a run with other options ({'; '.join(diff[:3])}"
                                     f"{'; ...' if len(diff) > 3 else ''}); pass --overwrite to replace it once the "
                                     "new run has finished, or another --out")
                return cls(out, out, listed, resumed=True)
            staging = out / STAGING
            staged = _read_marker(staging) if staging.is_dir() else None
            if staged is not None and not _options_diff(cls._saved_options(staging), options, ignore):
                return cls(out, staging, staged, resumed=True)
            if staging.exists():  # an earlier replacement with other options, never finished: ours to discard
                _remove_listed(staging, (staged or set()) | {MARKER})
                if staging.exists() and any(staging.iterdir()):
                    raise UsageError(f"{staging} holds files cstar-fx did not write; move them away")
            return cls._fresh(out, staging, options)
        except OSError as exc:
            raise UsageError(f"cannot write the run folder {out}: {exc.strerror or exc}; pass a writable --out") from None

    @staticmethod
    def _saved_options(folder: Path) -> dict[str, Any]:
        try:
            saved = json.loads((folder / "config.json").read_text())["options"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise UsageError(f"run folder {folder} has no readable config.json; pass --overwrite or another --out")\
                from None
        return saved if isinstance(saved, dict) else {}

    @staticmethod
    def _refuse_foreign(folder: Path, listed: set[str], entries: list[str]) -> None:
        for entry in entries:
            foreign = sorted(_files_under(folder, entry) - listed)
            if foreign or ((folder / entry).exists() and not (folder / entry).is_dir() and entry not in listed):
                name = foreign[0] if foreign else entry
                raise UsageError(f"{folder / name} was not written by cstar-fx and the run would write there; "
                                 "move it out of the run folder, or pass another --out")

    @classmethod
    def _fresh(cls, root: Path, path: Path, options: dict[str, Any]) -> RunFolder:
        import cstar_fx

        path.mkdir(parents=True, exist_ok=True)
        folder = cls(root, path, set(), resumed=False)
        _write_marker(path, ())  # first: from now on the folder is recognisably the tool's
        folder.write_text("config.json", json.dumps({"format": _CONFIG_FORMAT, "version": cstar_fx.__version__,
                                                     "options": _json(options)}, indent=2))
        return folder

    def record(self, *entries: str) -> None:
        """Add the files at (or under) these paths, relative to :attr:`path`, to the marker's list.

        Example:
            >>> import tempfile
            >>> folder = RunFolder.claim(Path(tempfile.mkdtemp()) / "r", {})
            >>> (folder.path / "plots").mkdir(); _ = (folder.path / "plots" / "a.png").write_bytes(b"x")
            >>> folder.record("plots"); "plots/a.png" in folder.files
            True
        """
        for entry in entries:
            self.files |= _files_under(self.path, entry)
        _write_marker(self.path, self.files)

    def write_text(self, name: str, text: str) -> None:
        """Write ``name`` (relative to :attr:`path`) atomically and record it.

        Example:
            >>> import tempfile
            >>> folder = RunFolder.claim(Path(tempfile.mkdtemp()) / "r", {})
            >>> folder.write_text("report.md", "# hi"); (folder.path / "report.md").read_text()
            '# hi'
        """
        with atomic_path(self.reserve(name)) as tmp:
            tmp.write_text(text)
            os.chmod(tmp, _FILE_MODE)  # a temporary file is private; a report is not

    def reserve(self, name: str) -> Path:
        """List ``name`` (relative to :attr:`path`) as the tool's before it is written, so that a crash
        leaves no unlisted file; returns its path, the folder above it created.

        Example:
            >>> import tempfile
            >>> folder = RunFolder.claim(Path(tempfile.mkdtemp()) / "r", {})
            >>> folder.reserve("onnx/m.onnx").parent.is_dir(), "onnx/m.onnx" in folder.files
            (True, True)
        """
        self.files.add(name)
        _write_marker(self.path, self.files)
        path = self.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def remove(self, name: str) -> None:
        """Delete a file the tool wrote here (a file it did not write is left alone).

        Example:
            >>> import tempfile
            >>> folder = RunFolder.claim(Path(tempfile.mkdtemp()) / "r", {})
            >>> folder.write_text("COMPLETE", "x"); folder.remove("COMPLETE"); (folder.path / "COMPLETE").exists()
            False
        """
        if name in self.files:
            _remove_listed(self.path, [name])
            self.files.discard(name)
            _write_marker(self.path, self.files)

    def finish(self) -> Path:
        """End the run: under ``--overwrite``, replace the previous run's files with this run's.

        Returns the run folder. Files the tool did not write stay where they are.

        Example:
            >>> import tempfile
            >>> out = Path(tempfile.mkdtemp()) / "r"
            >>> RunFolder.claim(out, {"lr": 1}).write_text("results.json", "old")
            >>> _ = (out / "notes.txt").write_text("mine")
            >>> new = RunFolder.claim(out, {"lr": 2}, overwrite=True, entries=["results.json"])
            >>> new.write_text("results.json", "new"); (out / "results.json").read_text()
            'old'
            >>> new.finish() == out, (out / "results.json").read_text(), (out / "notes.txt").read_text()
            (True, 'new', 'mine')
        """
        if not self.staged:
            return self.root
        old = _read_marker(self.root) or set()
        _write_marker(self.root, old | self.files)  # a crash in between still lists every file of both runs
        _remove_listed(self.root, old - self.files)
        for rel in sorted(self.files):
            src, dst = self.path / rel, self.root / rel
            if src.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
        _write_marker(self.root, self.files)
        _remove_listed(self.path, self.files | {MARKER})
        if self.path.exists() and not any(self.path.iterdir()):
            shutil.rmtree(self.path, ignore_errors=True)
        self.path = self.root
        return self.root
