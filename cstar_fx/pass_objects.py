"""cstar_fx as ``torch.fx`` pass objects, for ``torch.fx.passes.infra.pass_manager.PassManager`` pipelines.

:class:`CstarPass` factorizes (``cstar_fx.transform``) and :class:`PrunePass` prunes channels
(:func:`cstar_fx.passes.prune.prune_to_ratio`); both implement ``torch.fx.passes.infra.pass_base.PassBase``
(``requires`` / ``call`` / ``ensures``) and return ``PassResult(graph_module, True)``, so "factorize, then
prune, then factorize again" is one ``PassManager`` list that also holds other people's passes. Neither
modifies the GraphModule it is given: each returns a new one.

Example:
    >>> import torch, torch.nn as nn
    >>> from torch.fx.passes.infra.pass_manager import PassManager
    >>> from cstar_fx import CstarPass
    >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)))
    >>> result = PassManager([CstarPass(ratio=2)])(gm)
    >>> result.modified, [n.target for n in result.graph_module.graph.nodes if n.op == "call_module"]
    (True, ['0.reduce', '0.expand', '1', '2'])
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .analysis import count_flops
from .api import get_plan, get_report, transform
from .config import CstarConfig, check_ratio, resolve_config, resolve_options
from .errors import CstarError, CstarTypeError, CstarValueError
from .extras import require
from .passes.prune import PRUNE_BUDGETS, budget_costs, budget_ratio, derive_plan, protected_layers, prune_to_ratio
from .passes.trace import trace

__all__ = ["CstarPass", "PrunePass", "PassCheckError"]

_TRANSFORM_ARGS = ("plan", "example_inputs", "decompose", "calibration")
_PRUNE_ARGS = ("importance", "round_to", "budget", "ignored_layers", "tolerance", "progress")


class PassCheckError(CstarError, RuntimeError):
    """A pass's result broke the pass's postcondition (``ensures``): a malformed graph or a missed budget.

    Example:
        >>> isinstance(PassCheckError("x"), RuntimeError)
        True
    """


def _require_graph_module(pass_name: str, graph_module: Any) -> None:
    if not isinstance(graph_module, fx.GraphModule):
        raise CstarTypeError(f"{pass_name} runs on a torch.fx.GraphModule, got "
                             f"{type(graph_module).__name__}; trace the model first and pass that: "
                             "torch.fx.symbolic_trace(model) or cstar_fx.passes.trace(model)")


def _lint(pass_name: str, graph_module: fx.GraphModule) -> None:
    try:
        graph_module.graph.lint()
    except Exception as exc:
        raise PassCheckError(f"{pass_name} produced a malformed graph: {exc}") from exc


class _CheckedPass(PassBase):
    def __call__(self, graph_module: fx.GraphModule) -> PassResult:
        # PassBase.__call__ runs ensures() on the *input*; these passes return a new GraphModule and leave the
        # input untouched, so the postcondition must be checked on the result instead.
        self.requires(graph_module)
        result = self.call(graph_module)
        self.ensures(result.graph_module)
        return result


class CstarPass(_CheckedPass):
    """``cstar_fx.transform`` as a ``torch.fx`` pass: factorize a GraphModule ``ratio`` (default 8) times smaller.

    ``options`` are :func:`cstar_fx.transform`'s (``plan``, ``example_inputs``, ``calibration``,
    ``decompose``) and :class:`cstar_fx.CstarConfig`'s (``budget``, ``round_to``, ``skip``, ...); they are
    checked here, so a misspelt option fails when the pipeline is built, not halfway through it.
    ``call`` returns ``PassResult(transform(gm, ratio, **options), True)``; the input is not modified.
    ``requires`` checks that the input is a GraphModule, ``ensures`` that the result's graph lints and
    that its rank plan reaches ``ratio`` in the budget's unit (for a plan the pass made itself). The ratio
    is relative to the pass's input, so after another compressing pass it compounds.

    Example:
        >>> import torch, torchvision, cstar_fx
        >>> gm = torch.fx.symbolic_trace(torchvision.models.resnet18(num_classes=10))
        >>> result = CstarPass(ratio=8)(gm)
        >>> result.modified, round(cstar_fx.get_report(result.graph_module).ratio_params, 1)
        (True, 8.0)
    """

    def __init__(self, ratio: Any = None, **options: Any) -> None:
        config_options = {k: v for k, v in options.items() if k not in _TRANSFORM_ARGS}
        # fail now on a bad ratio or option (no ratio: 8, or the ranks of the plan given to the pass)
        if "plan" in options:
            if ratio is not None:
                raise CstarValueError(f"CstarPass({ratio!r}, plan=...): the plan fixes every rank, so the ratio "
                                      "would be ignored; drop the ratio, or drop plan= to plan at that ratio")
            resolve_options(config_options)
        else:
            resolve_config(CstarConfig.ratio if ratio is None else ratio, config_options)
        self.ratio = ratio
        self.options = dict(options)

    def requires(self, graph_module: fx.GraphModule) -> None:
        """The input must be a GraphModule.

        Example:
            >>> import torch.nn as nn
            >>> CstarPass(ratio=2).requires(nn.Linear(4, 4))
            Traceback (most recent call last):
            ...
            cstar_fx.errors.CstarTypeError: CstarPass runs on a torch.fx.GraphModule, got Linear; ...
        """
        _require_graph_module(type(self).__name__, graph_module)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        """Factorize a copy of ``graph_module``: ``PassResult(transform(graph_module, ...), True)``.

        Example:
            >>> import torch, torch.nn as nn
            >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)))
            >>> CstarPass(ratio=2).call(gm).graph_module is gm
            False
        """
        return PassResult(transform(graph_module, self.ratio, **self.options), True)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        """The result's graph lints and its rank plan reaches the ratio asked for.

        Example:
            >>> import torch, torch.nn as nn
            >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)))
            >>> CstarPass(ratio=2).ensures(gm)  # a GraphModule cstar_fx did not make
            Traceback (most recent call last):
            ...
            cstar_fx.pass_objects.PassCheckError: CstarPass: the result has no rank plan ...
        """
        name = type(self).__name__
        _lint(name, graph_module)
        try:
            plan = get_plan(graph_module)
        except ValueError:
            raise PassCheckError(f"{name}: the result has no rank plan (gm.meta['cstar_plan']); it was not made by "
                                 f"cstar_fx.transform") from None
        if "plan" in self.options or not plan.target_ratio or not plan.cost or plan.dense_cost is None:
            return  # a given plan fixes the ranks; there is no budget of the pass's own to check
        achieved = plan.dense_cost / plan.cost
        if achieved < plan.target_ratio * (1 - 1e-9):
            raise PassCheckError(f"{name}: the plan reaches {achieved:.3f}x ({plan.budget}), short of the "
                                 f"{plan.target_ratio:g}x asked for")


class PrunePass(_CheckedPass):
    """:func:`cstar_fx.passes.prune.prune_to_ratio` as a ``torch.fx`` pass: Torch-Pruning channel pruning
    that makes a GraphModule ``ratio`` times smaller (parameters; FLOPs with ``budget="flops"``; both with
    ``budget="both"``).

    ``example_inputs`` are what Torch-Pruning traces the dependencies with; ``options`` are
    ``prune_to_ratio``'s (``importance``, ``round_to``, ``budget``, ``ignored_layers`` given by *name*,
    since each pass sees a new copy, ``tolerance``, ``progress``). ``keep_ranks=True`` on a factorized
    GraphModule keeps every rank as planned (its ``reduce``/``core`` factors are not pruned). The
    classifier keeps its outputs. The input is not modified; a pruned module that is no longer a
    GraphModule is traced again. On a factorized input the rank plan is re-read from the pruned modules
    (:func:`cstar_fx.passes.prune.derive_plan`) and the report's parameter (and FLOP) counts are recounted,
    so ``cstar_fx.get_report`` stays end to end. ``ensures`` checks the graph lints and that the
    pruning landed within ``tolerance`` of ``ratio``, relative to the pass's input.

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(),
        ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
        >>> gm = torch.fx.symbolic_trace(model)
        >>> result = PrunePass(2, torch.randn(1, 3, 16, 16), round_to=1)(gm)
        >>> count = lambda m: sum(p.numel() for p in m.parameters())
        >>> abs(count(gm) / count(result.graph_module) / 2 - 1) <= 0.03
        True
    """

    def __init__(self, ratio: float, example_inputs: Any, *, keep_ranks: bool = False, **options: Any) -> None:
        unknown = sorted(set(options) - set(_PRUNE_ARGS))
        if unknown:
            raise CstarTypeError(f"unknown option(s) {unknown}; PrunePass takes prune_to_ratio's options "
                                 f"{list(_PRUNE_ARGS)} and keep_ranks")
        if not isinstance(keep_ranks, bool):
            raise CstarTypeError(f"keep_ranks must be True or False, got {keep_ranks!r}")
        if options.get("budget", "params") not in PRUNE_BUDGETS:
            raise CstarValueError(f"budget must be one of {', '.join(map(repr, PRUNE_BUDGETS))}, "
                                  f"got {options['budget']!r}")
        ignored = options.get("ignored_layers")
        if ignored is not None and any(not isinstance(x, str) for x in ((ignored,) if isinstance(ignored, str)
                                                                        else ignored)):
            raise CstarTypeError("PrunePass takes ignored_layers by name (e.g. ignored_layers=['fc']): each pass in a "
                                 "pipeline runs on a new copy, where the module objects are different")
        require("torch_pruning", purpose="PrunePass (Torch-Pruning)")  # fail when the pipeline is built, not run
        self.ratio = check_ratio(ratio)
        self.example_inputs = example_inputs
        self.keep_ranks = keep_ranks
        self.options = dict(options)

    def requires(self, graph_module: fx.GraphModule) -> None:
        """The input must be a GraphModule (with a rank plan, when ``keep_ranks=True``).

        Example:
            >>> import torch, torch.nn as nn
            >>> PrunePass(2, torch.randn(1, 4)).requires(nn.Linear(4, 4))
            Traceback (most recent call last):
            ...
            cstar_fx.errors.CstarTypeError: PrunePass runs on a torch.fx.GraphModule, got Linear; ...
        """
        _require_graph_module(type(self).__name__, graph_module)
        if self.keep_ranks and "cstar_plan" not in graph_module.meta:
            raise CstarValueError("PrunePass(keep_ranks=True) needs a factorized GraphModule (from "
                                  "cstar_fx.transform or CstarPass); put a CstarPass before it, or drop keep_ranks")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        """Prune a copy of ``graph_module``: ``PassResult(pruned, True)``.

        Example:
            >>> import torch, torch.nn as nn
            >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)))
            >>> out = PrunePass(2, torch.randn(1, 32), round_to=1).call(gm).graph_module
            >>> out is gm, out.get_submodule("0").out_features < 64, gm.get_submodule("0").out_features
            (False, True, 64)
        """
        options = dict(self.options)
        if self.keep_ranks:
            names = {m: n for n, m in graph_module.named_modules()}
            ignored = options.get("ignored_layers") or []
            options["ignored_layers"] = [*([ignored] if isinstance(ignored, str) else ignored),
                                         *(names[m] for m in protected_layers(graph_module))]
        budget = options.get("budget", "params")
        dense = budget_costs(graph_module, self.example_inputs, budget)
        pruned = prune_to_ratio(graph_module, self.ratio, self.example_inputs, **options)
        if not isinstance(pruned, fx.GraphModule):
            pruned = trace(pruned)
        plan = graph_module.meta.get("cstar_plan")
        if plan is not None:
            with_flops = plan.flops is not None
            pruned.meta["cstar_plan"] = derive_plan(pruned, plan,
                                                    example_inputs=self.example_inputs if with_flops else None)
            if "cstar_report" in graph_module.meta:
                report = get_report(graph_module)
                flops = (count_flops(pruned, self.example_inputs) if report.flops is not None else None)
                pruned.meta["cstar_report"] = dataclasses.replace(
                    report, params=sum(p.numel() for p in pruned.parameters()), flops=flops)
        achieved = budget_ratio(dense, budget_costs(pruned, self.example_inputs, budget))
        pruned.meta["cstar_prune"] = {"budget": budget, "ratio": self.ratio, "achieved": achieved,
                                      "tolerance": self.options.get("tolerance", 0.03)}
        return PassResult(pruned, True)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        """The result's graph lints and the pruning landed within ``tolerance`` of ``ratio``.

        Example:
            >>> import torch, torch.nn as nn
            >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)))
            >>> PrunePass(2, torch.randn(1, 32)).ensures(gm)  # not pruned by a PrunePass
            Traceback (most recent call last):
            ...
            cstar_fx.pass_objects.PassCheckError: PrunePass: the result was not made by a PrunePass ...
        """
        name = type(self).__name__
        _lint(name, graph_module)
        done = graph_module.meta.get("cstar_prune")
        if done is None:
            raise PassCheckError(f"{name}: the result was not made by a PrunePass (no gm.meta['cstar_prune'])")
        if abs(done["achieved"] / done["ratio"] - 1) > done["tolerance"]:
            raise PassCheckError(f"{name}: pruning reached {done['achieved']:.3f}x ({done['budget']}), not within "
                                 f"{done['tolerance']:.0%} of the {done['ratio']:g}x asked for")
