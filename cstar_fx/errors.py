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

__all__ = ["CstarError", "PlanMismatchError", "NoEligibleLayerError", "MissingExtraError"]


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

