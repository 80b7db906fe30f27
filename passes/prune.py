"""Torch-Pruning interop, in both orders, and the structured-pruning baseline.

* **Factorize, then prune.** A GraphModule from :func:`cstar_fx.transform` holds plain ``nn.Conv2d``/
  ``nn.Linear`` factors, each called as its own module, so Torch-Pruning's ``DependencyGraph`` sees the
  rank channels between factors as ordinary prunable groups. :func:`protected_layers` lists the factors
  to pass as ``ignored_layers`` when the ranks must stay as planned; :func:`derive_plan` rebuilds a
  truthful rank plan from the module shapes after pruning.
* **Prune, then factorize.** ``transform`` accepts a model Torch-Pruning has pruned (odd widths included).
* **The baseline.** :func:`prune_to_ratio` prunes channels with Torch-Pruning until the model is the
  requested number of times smaller (parameters or FLOPs), measured as ``transform`` measures it.

Torch-Pruning is an optional dependency (``pip install "cstar-fx[pruning]"``); it is imported only when
a function here needs it.

Example:
    >>> import torch, torch.nn as nn
    >>> from cstar_fx.passes.prune import prune_to_ratio
    >>> model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(),
    ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    >>> small = prune_to_ratio(model, 4, torch.randn(1, 3, 16, 16), round_to=1)
    >>> small(torch.randn(2, 3, 16, 16)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from tqdm.auto import tqdm

from ..allocate import UnreachableBudgetError
from ..analysis import count_flops, count_params, positions
from ..config import check_ratio
from ..costs import FlopCost, LayerSpec, ParamCost
from ..errors import CstarTypeError, CstarValueError, PlanMismatchError
from ..extras import require
from ..plan import LayerPlan, RankPlan, get_plan
from ..schemes import DENSE, Factors, get
from ..torchutil import as_tuple, eval_mode
from .discover import find_layers
from .shapes import record_shapes

__all__ = ["IMPORTANCES", "PRUNE_BUDGETS", "budget_costs", "budget_ratio", "protected_layers", "output_layers",
           "derive_plan", "prune_to_ratio", "prune_to_ratio_finer"]

IMPORTANCES = ("l2", "l1", "fpgm", "lamp", "bn", "random")
"""Importance names accepted by :func:`prune_to_ratio` (Torch-Pruning estimators)."""

PRUNE_BUDGETS = ("params", "flops", "both")
"""What a pruning ratio can count (:func:`prune_to_ratio`'s ``budget``)."""


def budget_costs(model: nn.Module, example_inputs: Any, budget: str) -> dict[str, float]:
    """The costs a pruning ``budget`` counts: ``{"params": ...}``, ``{"flops": ...}`` or both (FLOPs of one
    forward pass on ``example_inputs``). A ratio under ``"both"`` is the smaller of the two ratios.

    Example:
        >>> budget_costs(nn.Linear(4, 2, bias=False), torch.randn(1, 4), "both")
        {'params': 8.0, 'flops': 16.0}
    """
    if budget not in PRUNE_BUDGETS:
        raise CstarValueError(f"budget must be one of {', '.join(map(repr, PRUNE_BUDGETS))}, got {budget!r}")
    out = {}
    if budget != "flops":
        out["params"] = float(count_params(model))
    if budget != "params":
        out["flops"] = count_flops(model, example_inputs)
    return out


def budget_ratio(dense: dict[str, float], costs: dict[str, float]) -> float:
    """How many times smaller ``costs`` are than ``dense`` (both from :func:`budget_costs`): under ``"both"`` the
    smaller of the two ratios, which is the one that must reach a target.

    Example:
        >>> budget_ratio({"params": 8.0, "flops": 16.0}, {"params": 2.0, "flops": 8.0})
        2.0
    """
    return min(dense[k] / v for k, v in costs.items())


def _tp() -> Any:
    (torch_pruning,) = require("torch_pruning", purpose="cstar_fx.passes.prune (Torch-Pruning)")
    return torch_pruning


def _containers(gm: nn.Module, plan: RankPlan) -> dict[str, Factors]:
    found: dict[str, Factors] = {}
    problems = []
    for name, lp in plan.factorized.items():
        path = lp.factor_path
        try:
            seq = gm.get_submodule(path)
        except AttributeError:
            problems.append(f"layer {name!r}: no factor container at {path!r}")
            continue
        if not isinstance(seq, Factors) or seq.scheme != lp.scheme:
            problems.append(f"layer {name!r}: {path!r} is a {type(seq).__name__}"
                            f"{f' of scheme {seq.scheme!r}' if isinstance(seq, Factors) else ''}, not the "
                            f"{lp.scheme} factor chain the plan says")
            continue
        found[name] = seq
    if problems:
        raise PlanMismatchError("the rank plan does not match this module:\n  " + "\n  ".join(problems)
                                + "\nPass the plan the module was transformed with (cstar_fx.get_plan(gm)).")
    return found


def protected_layers(gm: fx.GraphModule, plan: RankPlan | None = None) -> list[nn.Module]:
    """The factor layers whose output channels are ranks: every factor but the last, ``expand`` (``reduce``, and
    ``core`` for Tucker-2).

    Pass them as Torch-Pruning's ``ignored_layers`` to keep every rank exactly as planned. The
    ``expand`` factors are left out on purpose: their outputs are the network's own channels, coupled to
    batch norms, residual adds and the next layers' inputs, so ignoring them would freeze the rest of
    the network too. ``plan`` defaults to :func:`cstar_fx.get_plan` of ``gm``.

    Example:
        >>> import torch.nn as nn, cstar_fx
        >>> gm = cstar_fx.transform(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)), ratio=2)
        >>> [type(m).__name__ for m in protected_layers(gm)]
        ['Linear', 'Linear']
    """
    plan = get_plan(gm) if plan is None else plan
    return [child for seq in _containers(gm, plan).values() for child in list(seq)[:-1]]


def _root_types() -> tuple[type, ...]:
    return (nn.modules.conv._ConvNd, nn.Linear)


@contextmanager
def _traceable(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and gradients on (Torch-Pruning traces with autograd); restores both afterwards.

    Flags are restored by parameter name because Torch-Pruning replaces the parameters it prunes.
    """
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        with eval_mode(model), torch.enable_grad():
            model.requires_grad_(True)
            yield model
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(grads.get(n, True))


def _build_graph(model: nn.Module, example_inputs: Any) -> Any:
    return _tp().DependencyGraph().build_dependency(model, example_inputs=as_tuple(example_inputs))


def _is_output_layer(dg: Any, module: nn.Module) -> bool:
    pruner = dg.get_pruner_of_module(module)
    if pruner is None or pruner.get_out_channels(module) is None:
        return False
    group = dg.get_pruning_group(module, pruner.prune_out_channels, [0])
    return not any(dg.is_in_channel_pruning_fn(dep.handler) and isinstance(dep.target.module, _root_types())
                   for dep, _ in group)


def _output_layers(dg: Any) -> list[nn.Module]:
    return [m for m in dg.module2node if isinstance(m, _root_types()) and _is_output_layer(dg, m)]


def output_layers(model: nn.Module, example_inputs: Any) -> list[nn.Module]:
    """The conv/linear layers whose output channels are the model's outputs (e.g. the classifier).

    No other layer consumes their channels, so pruning them would change the output size. Pass them as
    Torch-Pruning's ``ignored_layers`` (with :func:`protected_layers` to keep ranks fixed too).

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> output_layers(model, torch.randn(1, 8)) == [model[2]]
        True
    """
    with _traceable(model):
        return _output_layers(_build_graph(model, example_inputs))


def _layer_nodes(gm: fx.GraphModule, plan: RankPlan, containers: dict[str, Factors]
                 ) -> dict[str, tuple[list[fx.Node], list[fx.Node]]]:
    """Per layer, the graph nodes that read its input (its first factor) and those that write its output
    (its last factor); several when the layer is shared."""
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    sites = {s.name: s for s in find_layers(gm)[0]}
    found = {}
    for name, lp in plan.layers.items():
        if lp.factorized:
            children = list(containers[name]._modules)
            found[name] = ([n for n in calls if n.target == f"{lp.factor_path}.{children[0]}"],
                           [n for n in calls if n.target == f"{lp.factor_path}.{children[-1]}"])
        elif name in sites:
            found[name] = (sites[name].nodes, sites[name].nodes)
        else:
            raise PlanMismatchError(f"layer {name!r} of the plan is not a conv/linear layer of this module")
    return found


def _dense_layer(gm: fx.GraphModule, lp: LayerPlan) -> tuple[tuple[int, ...], bool]:
    if lp.form == "function":  # the weight is a parameter read by F.conv2d / F.linear
        weight = gm.get_parameter(lp.param)
        # the plan counted weight and bias together; a bias is whatever exceeds the weight
        return tuple(weight.shape), lp.dense_params > math.prod(lp.weight_shape)
    mod = gm.get_submodule(lp.name)
    return tuple(mod.weight.shape), mod.bias is not None


def derive_plan(gm: fx.GraphModule, original_plan: RankPlan | None = None, *,
                example_inputs: Any = None) -> RankPlan:
    """A rank plan read back from ``gm``'s module shapes, for use after Torch-Pruning changed them.

    For every layer of ``original_plan`` (default :func:`cstar_fx.get_plan` of ``gm``) the weight shape
    (of the dense equivalent), the ranks (from the ``reduce``/``core``/``expand`` factors) and the
    parameter counts are those of the modules now. ``params`` is ``gm``'s parameter count;
    ``dense_params``, ``dense_flops`` and ``dense_cost`` stay those of the original dense model, so the
    ratios are end-to-end. With ``example_inputs`` FLOPs are counted again, otherwise they are ``None``.
    Costs in the plan's budget unit are recounted for ``"params"``/``"flops"``; a custom cost (latency)
    of a changed layer becomes ``None``. A layer that pruning changed says so in ``reason``; its
    ``energy`` is the one measured at transform time.

    Example:
        >>> import torch, torch.nn as nn, cstar_fx
        >>> gm = cstar_fx.transform(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)), ratio=2)
        >>> derive_plan(gm) == cstar_fx.get_plan(gm)  # nothing pruned yet
        True
    """
    plan = get_plan(gm) if original_plan is None else original_plan
    if not isinstance(plan, RankPlan):
        raise CstarTypeError(f"original_plan must be a cstar_fx.RankPlan, got {type(plan).__name__}")
    containers = _containers(gm, plan)
    shapes = {}
    if example_inputs is not None:
        wanted = _layer_nodes(gm, plan, containers)
        shapes = record_shapes(gm, example_inputs, {n for ins, outs in wanted.values() for n in (*ins, *outs)})
    params, flops = ParamCost(), FlopCost()
    layers: dict[str, LayerPlan] = {}
    any_changed = False
    for name, lp in plan.layers.items():
        if lp.factorized:
            shape, ranks, has_bias = get(lp.scheme).read_back(containers[name], lp.weight_shape[2:])
        else:
            (shape, has_bias), ranks = _dense_layer(gm, lp), ()
        p_in = p_out = in_shape = out_shape = None
        if shapes:
            ins, outs = wanted[name]
            p_in = sum(positions(shapes[n][0], lp.kind) for n in ins)
            p_out = sum(positions(shapes[n][1], lp.kind) for n in outs)
            in_shape, out_shape = shapes[ins[0]][0], shapes[outs[0]][1]
        spec = LayerSpec(name, lp.kind, shape, has_bias, (), p_in, p_out, in_shape, out_shape)
        changed = shape != lp.weight_shape or ranks != lp.ranks
        reason = lp.reason
        if changed:
            what = f"shape {_fmt(lp.weight_shape)} -> {_fmt(shape)}"
            if lp.factorized:
                what += f", ranks {_fmt(lp.ranks)} -> {_fmt(ranks)}"
            note = f"pruned after transform: {what}; energy is from before pruning"
            reason = f"{reason}; {note}" if reason else note
        new = dataclasses.replace(
            lp, weight_shape=shape, ranks=ranks, reason=reason,
            dense_params=int(params(spec, DENSE, ())), params=int(params(spec, lp.scheme, ranks)),
            dense_flops=flops(spec, DENSE, ()) if shapes else None,
            flops=flops(spec, lp.scheme, ranks) if shapes else None)
        layers[name] = dataclasses.replace(new, **_budget_costs(plan.budget, lp, new, changed))
        any_changed |= changed
    total_params = sum(p.numel() for p in gm.parameters())
    total_flops = count_flops(gm, example_inputs) if example_inputs is not None else None
    totals = {"params": float(total_params), "flops": total_flops}
    cost = totals[plan.budget] if plan.budget in totals else (None if any_changed else plan.cost)
    return dataclasses.replace(plan, layers=layers, params=total_params, flops=total_flops, cost=cost)


def _budget_costs(budget: str, old: LayerPlan, new: LayerPlan, changed: bool) -> dict[str, float | None]:
    """A layer's cost in the plan's budget unit, recounted where the unit is parameters or FLOPs; a
    custom cost (e.g. measured latency) of a changed layer is unknown."""
    if old.dense_cost is None:
        return {}
    if budget == "params":
        return {"dense_cost": float(new.dense_params), "cost": float(new.params)}
    if budget == "flops":
        return {"dense_cost": new.dense_flops, "cost": new.flops}
    return {"dense_cost": None, "cost": None} if changed else {}


def _fmt(values: tuple[int, ...]) -> str:
    return "x".join(map(str, values)) if values else "-"


def _importance(importance: str | Callable[..., Any]) -> Callable[..., Any]:
    if callable(importance) and not isinstance(importance, str):
        return importance
    imp = _tp().importance
    makers = {"l2": lambda: imp.MagnitudeImportance(p=2), "l1": lambda: imp.MagnitudeImportance(p=1),
              "fpgm": imp.FPGMImportance, "lamp": imp.LAMPImportance, "bn": imp.BNScaleImportance,
              "random": imp.RandomImportance}
    if importance not in makers:
        raise CstarValueError(f"unknown importance {importance!r}; choose one of {', '.join(IMPORTANCES)} "
                              "or pass a torch_pruning.importance object")
    return makers[importance]()


@dataclasses.dataclass
class _Group:
    root: str  # name of the layer whose output channels root the group
    order: torch.Tensor  # channel indices, least important first
    scores: torch.Tensor  # importance of each channel, in channel order


def _score_groups(model: nn.Module, example_inputs: Any, importance: Callable[..., Any],
                  ignored: list[nn.Module]) -> list[_Group]:
    names = {m: n for n, m in model.named_modules()}
    with _traceable(model):
        dg = _build_graph(model, example_inputs)
        skip = list(ignored) + _output_layers(dg)
        skip = [m for layer in skip for m in layer.modules()]
        groups = []
        for group in dg.get_all_groups(ignored_layers=skip, root_module_types=_root_types()):
            scores = importance(group)
            if scores is None:  # a group without weights to score (Torch-Pruning skips these too)
                continue
            scores = scores.detach().float().cpu()
            groups.append(_Group(names[group[0].dep.target.module], torch.argsort(scores, stable=True), scores))
    return groups


def _keep(n_channels: int, n_above: int, round_to: int) -> int:
    """Channels a group keeps: those at or above the threshold, rounded up to ``round_to``, never below
    ``round_to`` (so no layer collapses), never above the layer's width."""
    kept = max(n_above, 1)
    return min(n_channels, max(round_to, math.ceil(kept / round_to) * round_to))


def _prune_copy(model: nn.Module, example_inputs: Any, groups: list[_Group], threshold: float,
                round_to: int) -> nn.Module:
    pruned = copy.deepcopy(model)
    with _traceable(pruned):
        dg = _build_graph(pruned, example_inputs)
        for g in groups:
            n = len(g.scores)
            n_drop = n - _keep(n, int((g.scores >= threshold).sum()), round_to)
            if n_drop <= 0:
                continue
            layer = pruned.get_submodule(g.root)
            fn = dg.get_pruner_of_module(layer).prune_out_channels
            dg.get_pruning_group(layer, fn, g.order[:n_drop].tolist()).prune()
    return pruned


def _resolve_ignored(model: nn.Module, ignored_layers: Iterable[nn.Module | str] | None) -> list[str]:
    if ignored_layers is None:
        return []
    if isinstance(ignored_layers, (str, nn.Module)):
        ignored_layers = [ignored_layers]
    names = {m: n for n, m in model.named_modules()}
    out = []
    for layer in ignored_layers:
        if isinstance(layer, str):
            try:
                model.get_submodule(layer)
            except AttributeError:
                raise CstarValueError(f"ignored_layers: the model has no submodule {layer!r}") from None
            out.append(layer)
        elif isinstance(layer, nn.Module) and layer in names:
            out.append(names[layer])
        else:
            raise CstarValueError(f"ignored_layers: {layer!r} is not a submodule (or submodule name) of the model; "
                                  "pass layers of the model you prune, e.g. ignored_layers=[model.fc]")
    return out


def prune_to_ratio(model: nn.Module, ratio: float, example_inputs: Any, *, importance: str | Callable[..., Any] = "l2",
                   round_to: int | None = 8, budget: str = "params",
                   ignored_layers: Iterable[nn.Module | str] | None = None, tolerance: float = 0.03,
                   at_least: bool = False, progress: bool = False) -> nn.Module:
    """Torch-Pruning channel pruning searched to make ``model`` ``ratio`` times smaller: the baseline.

    Channels are ranked globally by a Torch-Pruning importance (``"l2"``: group L2 magnitude,
    normalised per group) over every dependency group of Torch-Pruning's ``DependencyGraph``; a
    bisection over the global threshold finds the pruning whose cost (``budget="params"``: all
    parameters; ``"flops"``: :func:`cstar_fx.count_flops` on ``example_inputs``; ``"both"``: the smaller
    of the two ratios) is closest to ``dense / ratio``, the way :func:`cstar_fx.transform` counts
    (``at_least=True``: the mildest pruning at least ``ratio`` times smaller, as ``transform``'s
    ``budget="both"`` promises; ``tolerance`` then bounds the overshoot). Each group keeps a multiple of
    ``round_to`` channels (or its full width) and at least ``round_to``, so no layer disappears. Layers
    whose outputs are the model's outputs (the classifier) and ``ignored_layers`` keep their output
    channels. Returns a pruned copy (same training/eval modes); ``model`` is not modified. Each search
    step prunes a fresh copy (about 15 steps; ``progress=True`` shows a tqdm bar).

    Raises ``ValueError`` for a ratio <= 1 or an unknown importance, and
    :class:`cstar_fx.UnreachableBudgetError` when even the narrowest allowed pruning is not small
    enough (the message gives the largest ratio reached) or when no pruning lands within
    ``tolerance`` (relative, default 3%) of ``ratio`` (the message gives the nearest ratios).

    Example:
        >>> import torch, torchvision
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> small = prune_to_ratio(model, 8, torch.randn(1, 3, 64, 64))
        >>> count = lambda m: sum(p.numel() for p in m.parameters())
        >>> abs(count(model) / count(small) / 8 - 1) <= 0.03
        True
    """
    ratio = check_ratio(ratio)
    if round_to is None:
        round_to = 1
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise CstarValueError(f"round_to must be an int >= 1 (or None for 1), got {round_to!r}")
    if not 0 < tolerance < 1:
        raise CstarValueError(f"tolerance must be in (0, 1), e.g. 0.03 for 3%, got {tolerance!r}")
    if not isinstance(at_least, bool):
        raise CstarTypeError(f"at_least must be True or False, got {at_least!r}")
    dense = budget_costs(model, example_inputs, budget)
    scorer = _importance(importance)
    ignored_names = _resolve_ignored(model, ignored_layers)

    def achieved(m: nn.Module) -> float:
        return budget_ratio(dense, budget_costs(m, example_inputs, budget))

    work = copy.deepcopy(model)  # scores come from a private copy: tracing sets eval mode and grads
    groups = _score_groups(work, example_inputs, scorer, [work.get_submodule(n) for n in ignored_names])
    if not groups:
        raise UnreachableBudgetError("no prunable channel group was found (every layer is ignored or an output "
                                     "layer); remove layers from ignored_layers", max_ratio=1.0)
    levels = sorted({float(s) for g in groups for s in g.scores})
    levels.append(math.inf)  # threshold above every score: every group at its floor

    ratios: dict[int, float] = {}  # threshold index -> achieved ratio (models are re-made, not kept)
    top = len(levels) - 1
    with tqdm(total=math.ceil(math.log2(len(levels))) + 2, desc=f"pruning to {ratio:g}x",
              disable=not progress) as bar:

        def trial(i: int) -> float:
            if i not in ratios:
                ratios[i] = achieved(_prune_copy(model, example_inputs, groups, levels[i], round_to))
                bar.update()
                bar.set_postfix(ratio=f"{ratios[i]:.3f}")
            return ratios[i]

        if trial(top) < ratio * (1 if at_least else 1 - tolerance):
            raise UnreachableBudgetError(
                f"channel pruning reaches at most {ratios[top]:.2f}x ({budget}) with round_to={round_to} on this "
                f"model, short of {ratio:g}x; lower the ratio{' or round_to' if round_to > 1 else ''}, or ignore "
                "fewer layers",
                max_ratio=ratios[top])
        # bisection for the smallest threshold whose pruning is `ratio` times smaller (cost falls as it rises)
        lo, hi = 0, top
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if trial(mid) >= ratio:
                hi = mid
            else:
                lo = mid
        best = hi if at_least else min((lo, hi), key=lambda i: abs(trial(i) / ratio - 1))
    if abs(ratios[best] / ratio - 1) > tolerance:
        raise UnreachableBudgetError(
            f"channel pruning cannot get within {tolerance:.0%} of {ratio:g}x ({budget}) with round_to={round_to}: "
            f"the nearest reachable ratios are {ratios[lo]:.3f}x and {ratios[hi]:.3f}x; use "
            f"{'a smaller round_to, ' if round_to > 1 else ''}a nearby ratio or a larger tolerance", max_ratio=ratios[top])
    return _prune_copy(model, example_inputs, groups, levels[best], round_to)


def prune_to_ratio_finer(model: nn.Module, ratio: float, example_inputs: Any, *, round_to: int | None = 8,
                         **options: Any) -> tuple[nn.Module, int]:
    """:func:`prune_to_ratio` at ``round_to``, or at the coarsest finer granularity that reaches ``ratio``.

    Whole multiples of ``round_to`` channels may overshoot the ratio on either side (a small network
    has few channels per group); the search is then repeated at ``round_to // 2``, ``// 4``, ..., 1,
    so the baseline is the ratio asked for rather than an error. Returns ``(pruned copy, round_to
    used)``. ``options`` are :func:`prune_to_ratio`'s (``importance``, ``budget``, ``tolerance``,
    ...). Raises :class:`cstar_fx.UnreachableBudgetError` (from the finest try, ``round_to=1``) when
    even single channels cannot reach it.

    Example:
        >>> import torch
        >>> from cstar_fx.models import small_cnn
        >>> torch.manual_seed(0); model = small_cnn(in_channels=1, num_classes=10)  # doctest: +ELLIPSIS
        <...>
        >>> small, used = prune_to_ratio_finer(model, 4, torch.randn(1, 1, 8, 8), round_to=8)  # 8 overshoots
        >>> count = lambda m: sum(p.numel() for p in m.parameters())
        >>> used, abs(count(model) / count(small) / 4 - 1) <= 0.03
        (4, True)
    """
    step = 1 if round_to is None else round_to
    while True:
        try:
            return prune_to_ratio(model, ratio, example_inputs, round_to=step, **options), step
        except UnreachableBudgetError:
            if step == 1:
                raise
            step = max(1, step // 2)
