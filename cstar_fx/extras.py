"""Optional dependencies: the one way cstar_fx imports a package that an extra (``pip install "cstar-fx[...]"``)
provides, so that a missing one always fails the same way, naming the command that installs it.

Example:
    >>> (np_mod,) = require("numpy")
    >>> np_mod.__name__
    'numpy'
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingExtraError

__all__ = ["require", "optional", "EXTRAS"]

#: Top-level package -> what installs it (the extras of pyproject.toml, or the package itself).
EXTRAS = {
    "onnx": "cstar-fx[onnx]", "onnxruntime": "cstar-fx[onnx]", "onnxscript": "cstar-fx[onnx]",
    "onnxconverter_common": "cstar-fx[onnx]", "torch_pruning": "cstar-fx[pruning]",
    "sklearn": "cstar-fx[data]", "PIL": "cstar-fx[data]", "matplotlib": "cstar-fx[report]",
    "pyautoattack": "cstar-fx[robust]", "timm": "cstar-fx[timm]", "safetensors": "safetensors",
}


def require(*names: str, purpose: str = "cstar_fx") -> tuple[ModuleType, ...]:
    """Import the modules ``names``, or raise :class:`~cstar_fx.errors.MissingExtraError` naming what
    ``purpose`` needs and the pip command that installs it.

    Example:
        >>> require("no_such_package_xyz", purpose="the demo")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        MissingExtraError: the demo needs the package 'no_such_package_xyz', which is not installed: ...
    """
    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ImportError as exc:
            top = name.partition(".")[0]
            install = EXTRAS.get(top, top)
            raise MissingExtraError(f"{purpose} needs the package {name!r}, which is not installed: "
                                    f'pip install "{install}"') from exc
    return tuple(modules)


def optional(name: str) -> ModuleType | None:
    """The module ``name`` if it can be imported, else ``None`` (for integrations that are used when present).

    Example:
        >>> optional("no_such_package_xyz") is None
        True
    """
    try:
        return importlib.import_module(name)
    except ImportError:
        return None
