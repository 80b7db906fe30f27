"""The errors cstar_fx raises on purpose: one base, :class:`CstarError`, under every one of them.

Each error also keeps the standard base its kind of mistake has (``ValueError`` for a bad value,
``ImportError`` for a missing package, ...), so ``except ValueError`` catches cstar_fx's bad values and
``except CstarError`` catches everything cstar_fx raised by design. The errors that one module owns
live there (``TraceError`` in :mod:`cstar_fx.passes.trace`, ``CheckpointError`` in :mod:`cstar_fx.io`,
...); this module holds the base and the errors several modules raise. docs/errors.md lists them all.

Example:
    >>> import cstar_fx
    >>> issubclass(cstar_fx.PlanMismatchError, CstarError) and issubclass(cstar_fx.PlanMismatchError, ValueError)
    True
"""

from __future__ import annotations

__all__ = ["CstarError", "PlanMismatchError", "NoEligibleLayerError", "MissingExtraError", "CstarValueError",
           "CstarTypeError", "CstarRuntimeError", "CstarKeyError", "CstarFileNotFoundError", "CstarIsADirectoryError",
           "CstarNotADirectoryError", "CstarFloatingPointError", "CstarNotImplementedError"]


class CstarError(Exception):
    """The base of every error cstar_fx raises on purpose; its message names the fix.

    Example:
        >>> from cstar_fx.passes.trace import TraceError
        >>> issubclass(TraceError, CstarError)
        True
    """


class PlanMismatchError(CstarError, ValueError):
    """A rank plan does not fit the model it is applied to.

    Example:
        >>> isinstance(PlanMismatchError("x"), ValueError)
        True
    """


class NoEligibleLayerError(CstarError, ValueError):
    """The model has no conv/linear layer that can be factorized.

    Example:
        >>> isinstance(NoEligibleLayerError("x"), ValueError)
        True
    """


class MissingExtraError(CstarError, ImportError):
    """An optional dependency is not installed; the message names the pip command.

    Example:
        >>> isinstance(MissingExtraError("pip install 'cstar-fx[robust]'"), ImportError)
        True
    """



class CstarValueError(CstarError, ValueError):
    """A bad argument value: cstar_fx's ``ValueError``.

    Example:
        >>> isinstance(CstarValueError("ratio must be > 1"), ValueError)
        True
    """


class CstarTypeError(CstarError, TypeError):
    """An argument of the wrong type: cstar_fx's ``TypeError``.

    Example:
        >>> isinstance(CstarTypeError("cfg must be a TrainConfig"), TypeError)
        True
    """


class CstarRuntimeError(CstarError, RuntimeError):
    """A request this environment or this model cannot carry out (no distributed group, a provider that is
    not usable here, an attention mask of the wrong shape): cstar_fx's ``RuntimeError``.

    Example:
        >>> isinstance(CstarRuntimeError("no torch.distributed"), RuntimeError)
        True
    """


class CstarKeyError(CstarError, KeyError):
    """A lookup by a name that is not there: cstar_fx's ``KeyError``.

    Example:
        >>> isinstance(CstarKeyError("no layer 'fc'"), KeyError)
        True
    """


class CstarFileNotFoundError(CstarError, FileNotFoundError):
    """A file or folder the call needs does not exist: cstar_fx's ``FileNotFoundError``.

    Example:
        >>> isinstance(CstarFileNotFoundError("no ONNX file at m.onnx"), OSError)
        True
    """


class CstarIsADirectoryError(CstarError, IsADirectoryError):
    """A folder was given where a file path is needed: cstar_fx's ``IsADirectoryError``.

    Example:
        >>> isinstance(CstarIsADirectoryError("runs is a directory; pass a file path"), OSError)
        True
    """


class CstarNotADirectoryError(CstarError, NotADirectoryError):
    """A file was found where a folder is needed: cstar_fx's ``NotADirectoryError``.

    Example:
        >>> isinstance(CstarNotADirectoryError("out.txt is a file, not a directory"), OSError)
        True
    """


class CstarFloatingPointError(CstarError, FloatingPointError):
    """A computation went non-finite (a training loss of NaN or Inf): cstar_fx's ``FloatingPointError``.

    Example:
        >>> isinstance(CstarFloatingPointError("training loss became nan"), ArithmeticError)
        True
    """


class CstarNotImplementedError(CstarError, NotImplementedError):
    """A model feature cstar_fx does not support: cstar_fx's ``NotImplementedError``.

    Example:
        >>> isinstance(CstarNotImplementedError("MultiheadAttention with bias_k"), NotImplementedError)
        True
    """
