"""Tracing with torch.fx, a leaf-module registry, and errors that say what to do.

Example:
    >>> import torch.nn as nn
    >>> from cstar_fx.passes.trace import trace
    >>> gm = trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    >>> [n.op for n in gm.graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any, TypeVar

import torch
import torch.fx as fx
import torch.nn as nn

__all__ = ["TraceError", "register_leaf", "registered_leaves", "trace", "CstarTracer"]

_LEAF_TYPES: set[type[nn.Module]] = set()
M = TypeVar("M", bound=type)


class TraceError(RuntimeError):
    """torch.fx could not trace the model; the message names the module and the fix.

    Example:
        >>> TraceError("fx could not trace 'block'").args[0]
        "fx could not trace 'block'"
    """


def register_leaf(cls: M) -> M:
    """Class decorator (or plain call): fx will not trace into modules of this type.

    Example:
        >>> import torch.nn as nn
        >>> @register_leaf
        ... class Opaque(nn.Module):
        ...     def forward(self, x):
        ...         return x if x.sum() > 0 else -x
        >>> Opaque in registered_leaves()
        True
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_leaf expects an nn.Module subclass, got {cls!r}")
    _LEAF_TYPES.add(cls)
    return cls


def registered_leaves() -> frozenset[type[nn.Module]]:
    """The module types registered with :func:`register_leaf`.

    Example:
        >>> isinstance(registered_leaves(), frozenset)
        True
    """
    return frozenset(_LEAF_TYPES)


class CstarTracer(fx.Tracer):
    """An fx tracer that honours the leaf registry and per-call leaf names/patterns/types, and
    remembers which module it was inside when tracing fails.

    Example:
        >>> import torch.nn as nn
        >>> graph = CstarTracer(leaf_modules=("0",)).trace(nn.Sequential(nn.Sequential(nn.ReLU())))
        >>> [n.target for n in graph.nodes if n.op == "call_module"]
        ['0']
    """

    def __init__(self, leaf_modules: Iterable[str | type] = ()) -> None:
        super().__init__()
        leaves = tuple(leaf_modules)
        self._leaf_names = tuple(x for x in leaves if isinstance(x, str))
        self._leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self.cstar_stack: list[tuple[str, str]] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, tuple(_LEAF_TYPES) + self._leaf_types):
            return True
        if any(fnmatch.fnmatchcase(module_qualified_name, pat) for pat in self._leaf_names):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        name = self.path_of_module(m)
        self.cstar_stack.append((name, type(m).__name__))
        try:
            out = super().call_module(m, forward, args, kwargs)
        except TraceError:
            raise
        except Exception as exc:
            raise _explain(self.cstar_stack, exc) from exc
        self.cstar_stack.pop()
        return out


def _explain(stack: list[tuple[str, str]], exc: Exception) -> TraceError:
    name, cls = stack[-1] if stack else ("<root>", "model")
    where = f"module {name!r} ({cls})" if name else f"the top-level module ({cls})"
    return TraceError(
        f"torch.fx could not trace {where}: {type(exc).__name__}: {exc}\n"
        f"Fix: mark it as a leaf so it is called opaquely — transform(..., leaf_modules=({name!r},)) or "
        f"@cstar_fx.register_leaf on class {cls} — or, for control flow that depends on an argument, pass "
        f"concrete_args={{...}} to fix that argument. Layers inside a leaf are not factorized."
    )


def trace(model: nn.Module, *, leaf_modules: Iterable[str | type] = (),
          concrete_args: dict[str, Any] | None = None) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule (a GraphModule is returned as it is).

    Raises :class:`TraceError` naming the module fx failed in and what to do about it.

    Example:
        >>> import torch.nn as nn
        >>> [n.op for n in trace(nn.Linear(3, 2)).graph.nodes]  # the root is traced into: F.linear on parameters
        ['placeholder', 'get_attr', 'get_attr', 'call_function', 'output']
    """
    if isinstance(model, fx.GraphModule):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module or torch.fx.GraphModule, got {type(model).__name__}")
    tracer = CstarTracer(leaf_modules)
    try:
        with torch.no_grad():
            graph = tracer.trace(model, concrete_args=concrete_args)
    except TraceError:
        raise
    except Exception as exc:
        raise _explain(tracer.cstar_stack or [("", type(model).__name__)], exc) from exc
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)
