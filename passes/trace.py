"""Tracing with torch.fx, a leaf-module registry, functions fx calls opaquely, and errors that say what to do.

When timm is loaded, its own not-traced registry (``timm.layers.register_notrace_module`` /
``register_notrace_function``) is honoured too, so timm models trace as timm traces them.

Example:
    >>> import torch.nn as nn
    >>> from cstar_fx.passes.trace import trace
    >>> gm = trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    >>> [n.op for n in gm.graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
"""

from __future__ import annotations

import copy
import fnmatch
import os
import sys
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, TypeVar

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import CstarError, CstarTypeError, CstarValueError
from ..extras import optional

__all__ = ["TraceError", "register_leaf", "registered_leaves", "timm_notrace", "trace", "CstarTracer", "check_hooks"]

_LEAF_TYPES: set[type[nn.Module]] = set()
M = TypeVar("M", bound=type)


class TraceError(CstarError, RuntimeError):
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
        raise CstarTypeError(f"register_leaf expects an nn.Module subclass, got {cls!r}")
    _LEAF_TYPES.add(cls)
    return cls


def registered_leaves() -> frozenset[type[nn.Module]]:
    """The module types registered with :func:`register_leaf`.

    Example:
        >>> isinstance(registered_leaves(), frozenset)
        True
    """
    return frozenset(_LEAF_TYPES)


def timm_notrace() -> tuple[tuple[Callable[..., Any], ...], tuple[type[nn.Module], ...]]:
    """timm's not-traced registry: (functions fx must call opaquely, module types it must not enter).

    Empty when timm has not been imported. Only an already-imported timm is consulted: a timm model
    cannot exist without it, and importing timm for every other model would cost seconds for nothing.
    Both registries are read from ``timm.layers`` (timm >= 1.0.17) or ``timm.models._features_fx``
    (older timm), through their public getters.

    Example:
        >>> functions, modules = timm_notrace()
        >>> isinstance(functions, tuple) and isinstance(modules, tuple)
        True
    """
    if "timm" not in sys.modules:
        return (), ()
    where = (optional(name) for name in ("timm.layers", "timm.models._features_fx"))
    mod = next((m for m in where if hasattr(m, "get_notrace_functions") and hasattr(m, "get_notrace_modules")), None)
    if mod is None:
        return (), ()
    functions = tuple(f for f in mod.get_notrace_functions() if callable(f) and not isinstance(f, type))
    modules = tuple(m for m in mod.get_notrace_modules() if isinstance(m, type) and issubclass(m, nn.Module))
    return functions, modules


class CstarTracer(fx.Tracer):
    """An fx tracer that honours the leaf registry, per-call leaf names/patterns/types, functions to call
    opaquely (``autowrap_functions``, plus timm's registry when timm is loaded), and remembers which module
    it was inside when tracing fails.

    Example:
        >>> import torch.nn as nn
        >>> graph = CstarTracer(leaf_modules=("0",)).trace(nn.Sequential(nn.Sequential(nn.ReLU())))
        >>> [n.target for n in graph.nodes if n.op == "call_module"]
        ['0']
    """

    def __init__(self, leaf_modules: Iterable[str | type] = (),
                 autowrap_functions: Iterable[Callable[..., Any]] = ()) -> None:
        timm_functions, timm_modules = timm_notrace()
        functions = tuple(autowrap_functions)
        super().__init__(autowrap_functions=functions + tuple(f for f in timm_functions if f not in functions))
        leaves = tuple(leaf_modules)
        self._leaf_names = tuple(x for x in leaves if isinstance(x, str))
        self._leaf_types = tuple(x for x in leaves if isinstance(x, type)) + timm_modules
        self.cstar_stack: list[tuple[str, str]] = []
        self.cstar_no_grad: list[tuple[str, str]] = []

    def create_node(self, kind: str, target: Any, args: Any, kwargs: Any, name: str | None = None,
                    type_expr: Any = None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        # fx does not record grad mode: an op traced while it is off came from a no_grad region in forward().
        if kind.startswith("call") and not torch.is_grad_enabled():
            # a leaf module's own call node is made inside call_module: the region belongs to its caller
            stack = self.cstar_stack[:-1] if kind == "call_module" else self.cstar_stack
            self.cstar_no_grad.append((node.name, stack[-1][0] if stack else ""))
        return node

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


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _culprit(tb: TracebackType | None) -> tuple[str, str] | None:
    """The innermost user frame of a failed trace: (qualified function name, "file:line")."""
    found = None
    while tb is not None:
        code = tb.tb_frame.f_code
        if not code.co_filename.startswith(_TORCH_DIR) and code.co_filename != __file__:
            found = (getattr(code, "co_qualname", code.co_name), f"{os.path.basename(code.co_filename)}:{tb.tb_lineno}")
        tb = tb.tb_next
    return found


def _explain(stack: list[tuple[str, str]], exc: Exception) -> TraceError:
    name, cls = stack[-1] if stack else ("", "model")
    culprit = _culprit(exc.__traceback__)
    where = f"module {name!r} ({cls})" if name else f"the top-level module ({cls})"
    if culprit:
        where += f", in {culprit[0]} at {culprit[1]}"
    # A module-level helper can be called opaquely; a forward (or a method) can only be made a leaf,
    # and the root module cannot be a leaf of itself.
    helper = culprit is not None and "." not in culprit[0] and "<" not in culprit[0]
    fixes = []
    if helper:
        fixes.append(f"let fx call the function {culprit[0]} opaquely: transform(..., "
                     f"autowrap_functions=({culprit[0]},)) or @torch.fx.wrap on it")
    if name:
        fixes.append(f"mark the module as a leaf so it is called opaquely: transform(..., leaf_modules=({name!r},)) "
                     f"or @cstar_fx.register_leaf on class {cls} (layers inside a leaf are not factorized)")
    fixes.append("for control flow that depends on a forward() argument, pass concrete_args={'name': value} "
                 "to fix that argument")
    if not name and not helper:
        fixes.append("for control flow on tensor values, move it into a module-level function and pass "
                     "autowrap_functions=(that_function,) so fx calls it opaquely")
    return TraceError(f"torch.fx could not trace {where}: {type(exc).__name__}: {exc}\nFix: " + "; or ".join(fixes) + ".")


def _unwrap_compiled(model: nn.Module) -> nn.Module:
    # torch.compile returns an OptimizedModule around the model; fx must trace the model itself.
    if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        return model._orig_mod
    return model


_LEGACY_FIX = {
    "SpectralNorm": "the legacy torch.nn.utils.spectral_norm hook: torch.fx would freeze today's normalised weight. "
                    "Fix: torch.nn.utils.remove_spectral_norm(module) first (or use "
                    "torch.nn.utils.parametrizations.spectral_norm, whose layers are kept dense)",
    "WeightNorm": "the legacy torch.nn.utils.weight_norm hook: torch.fx would freeze today's weight g * v / |v|. "
                  "Fix: torch.nn.utils.remove_weight_norm(module) first (or use "
                  "torch.nn.utils.parametrizations.weight_norm, whose layers are kept dense)",
    "BasePruningMethod": "a torch.nn.utils.prune mask (weight_orig + a forward pre-hook): torch.fx would freeze "
                         "today's masked weight and drop the mask. Fix: torch.nn.utils.prune.remove(module, 'weight') "
                         "first, to make the pruning permanent",
}


def _legacy_kind(hook: Any) -> str | None:
    for cls in type(hook).__mro__:
        if cls.__name__ in _LEGACY_FIX and cls.__module__.startswith("torch.nn.utils"):
            return cls.__name__
    return None


def check_hooks(model: nn.Module) -> None:
    """Refuse a model whose modules carry hooks: torch.fx calls ``forward`` directly, so forward and
    backward hooks (and the hook-based legacy ``spectral_norm``/``weight_norm`` and ``torch.nn.utils.prune``
    masks) would be dropped from the traced model without a word. Raises :class:`TraceError` naming the
    module and the fix. The input-check hooks of a ``torch.export`` module are torch's own and allowed.

    Example:
        >>> import torch.nn as nn
        >>> m = nn.Sequential(nn.Linear(4, 4))
        >>> _ = m[0].register_forward_hook(lambda mod, inp, out: out * 2)
        >>> try:
        ...     check_hooks(m)
        ... except TraceError as err:
        ...     print(str(err)[:49])
        module '0' (Linear) has a forward hook (<lambda>)
    """
    for name, m in model.named_modules():
        where = f"module {name!r} ({type(m).__name__})" if name else f"the top-level module ({type(m).__name__})"
        for hook in m._forward_pre_hooks.values():
            kind = _legacy_kind(hook)
            if kind:
                raise TraceError(f"{where} uses {_LEGACY_FIX[kind]}.")
        for attr, what in (("_forward_pre_hooks", "forward pre-hook"), ("_forward_hooks", "forward hook"),
                           ("_backward_pre_hooks", "backward pre-hook"), ("_backward_hooks", "backward hook")):
            # torch.export's .module() carries its own input checks as hooks; its graph repeats them
            hooks = [fn for fn in getattr(m, attr, {}).values()
                     if not str(getattr(fn, "__module__", "")).startswith("torch.export.")]
            if hooks:
                fn = hooks[0]
                label = getattr(fn, "__qualname__", type(fn).__name__)
                raise TraceError(f"{where} has a {what} ({label}), which torch.fx does not trace: the transformed "
                                 f"model would silently run without it. Fix: remove it (handle.remove()) before "
                                 f"transform and register it on the returned model, or move what it does into "
                                 f"forward().")


def _private_copy(model: nn.Module) -> nn.Module | None:
    try:
        return copy.deepcopy(model)
    except Exception:  # modules holding non-copyable objects; fall back to tracing the model itself
        return None


def _leaf_fix(owner: str, what: str) -> str:
    # The root cannot be a leaf of itself: leaf_modules=("",) would do nothing.
    if owner:
        return (f"mark module {owner!r} a leaf so it runs as it is (transform(..., leaf_modules=({owner!r},)); "
                f"layers inside a leaf are not factorized), or {what}")
    return f"{what}, or move it into a submodule and mark that submodule a leaf (leaf_modules=('name',))"


def check_leaf_patterns(model: nn.Module, leaf_modules: Iterable[str | type]) -> None:
    """A leaf name or pattern that matches no submodule is a typo (it would leave the model traced through)."""
    names = [n for n, _ in model.named_modules() if n]
    unmatched = [p for p in leaf_modules if isinstance(p, str) and p
                 and not any(n == p or fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        shown = ", ".join(repr(n) for n in names[:8]) + (" ..." if len(names) > 8 else "")
        raise CstarValueError(f"leaf_modules pattern(s) {unmatched} match no submodule of this model, so "
                              "they would mark nothing a leaf; the submodules are named "
                              f"{shown or '(none)'} (globs such as 'blocks.*.attn' match timm-style names)")


def trace(model: nn.Module, *, leaf_modules: Iterable[str | type] = (),
          concrete_args: dict[str, Any] | None = None,
          autowrap_functions: Iterable[Callable[..., Any]] = ()) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule (a GraphModule is returned as it is).

    ``leaf_modules`` (names, glob patterns or classes) are called opaquely, ``autowrap_functions``
    (module-level functions, e.g. helpers with data-dependent control flow) appear as single
    ``call_function`` nodes, and ``concrete_args`` fixes forward() arguments. A ``torch.compile``
    wrapper is traced through to the module it compiles. Raises :class:`TraceError` naming the
    module (and function) fx failed in and what to do about it.

    ``model`` is never changed: fx runs ``forward`` on a private copy, so buffer updates and attribute
    caches written while tracing stay there. Behaviour fx cannot record is refused with a
    :class:`TraceError` that names the fix rather than silently dropped: hooks (see :func:`check_hooks`),
    buffers updated in place by ``forward`` (``self.calls.add_(1)``) and ``torch.no_grad()`` regions
    in ``forward``; mark the module that does it a leaf (``leaf_modules=``) to keep it as it is.

    Example:
        >>> import torch.nn as nn
        >>> [n.op for n in trace(nn.Linear(3, 2)).graph.nodes]  # the root is traced into: F.linear on parameters
        ['placeholder', 'get_attr', 'get_attr', 'call_function', 'output']
    """
    if isinstance(model, nn.Module):
        model = _unwrap_compiled(model)
    if isinstance(model, fx.GraphModule):
        check_hooks(model)
        return model
    if not isinstance(model, nn.Module):
        raise CstarTypeError(f"expected a torch.nn.Module or torch.fx.GraphModule, got {type(model).__name__}")
    check_hooks(model)
    root = _private_copy(model)
    before = dict(model.named_buffers())
    saved = None
    if root is None:
        root = model
        saved = {k: b.detach().clone() for k, b in before.items()}
    tracer = CstarTracer(leaf_modules, autowrap_functions)
    try:
        with torch.enable_grad():  # so that a no_grad region inside forward() can be seen
            graph = tracer.trace(root, concrete_args=concrete_args)
    except TraceError:
        raise
    except Exception as exc:
        raise _explain(tracer.cstar_stack or [("", type(model).__name__)], exc) from exc
    finally:
        if saved is not None:
            with torch.no_grad():
                for k, b in before.items():
                    b.copy_(saved[k])
    reference = saved if saved is not None else before
    for k, b in root.named_buffers():
        ref = reference.get(k)
        if ref is not None and not ref.is_meta and not b.is_meta and (ref.shape != b.shape or not torch.equal(ref, b)):
            raise TraceError(f"forward() changes the buffer {k!r} in place (e.g. self.{k.rpartition('.')[2]}.add_(1)); "
                             f"torch.fx cannot record that, so the transformed model would never update it. Fix: "
                             + _leaf_fix(k.rpartition(".")[0], "update the buffer outside forward()") + ".")
    if tracer.cstar_no_grad:
        node, owner = tracer.cstar_no_grad[0]
        where = f"module {owner!r}" if owner else "the top-level module"
        raise TraceError(f"forward() of {where} runs {node!r} (and {len(tracer.cstar_no_grad) - 1} more op(s)) under "
                         f"torch.no_grad(); torch.fx does not record grad mode, so the transformed model would compute "
                         f"gradients there. Fix: " + _leaf_fix(owner, "move the no_grad region out of forward()") + ".")
    name = type(model).__name__
    return fx.GraphModule(root, graph, name)
