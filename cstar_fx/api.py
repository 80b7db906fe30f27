"""The public verbs: ``plan_ranks`` (read-only) and ``transform`` (plan, then rewrite a private copy).

What they are made of lives below: :mod:`cstar_fx.analysis` reads the model, :mod:`cstar_fx.planner` plans
under the budget :mod:`cstar_fx.config` describes, :mod:`cstar_fx.plan` assembles and checks plans, the
passes rewrite the graph and :mod:`cstar_fx.report` measures the result.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .analysis import analyse, check_trace_options, count_flops, count_params
from .config import CstarConfig, resolve_config, resolve_options
from .errors import CstarTypeError, CstarValueError, NoEligibleLayerError, PlanMismatchError
from .passes.discover import LayerSite, reads_metadata_only
from .passes.factorize import dense_weight, factorize, factors_path
from .plan import RankPlan, check_plan, full_rank_plan, get_plan
from .planner import plan_under
from .report import build_report, get_report

__all__ = ["plan_ranks", "transform", "refold", "full_rank_plan", "get_plan", "get_report", "PlanMismatchError",
           "NoEligibleLayerError"]


def plan_ranks(model: nn.Module, ratio: float | CstarConfig = 8, *, budget: str = "params",
               example_inputs: Any = None, target_speedup: float | None = None, latency_ms: float | None = None,
               sensitivity: dict[str, float] | None = None, **options: Any) -> RankPlan:
    """Choose per-layer schemes and ranks under one global budget. Never modifies ``model``.

    ``ratio`` is dense cost / compressed cost for the whole model; ``budget`` is ``"params"``,
    ``"flops"``, ``"both"`` (at least ``ratio`` in each) or ``"latency"`` (measured on ``target=LatencyTarget(...)``; then ``target_speedup`` or
    ``latency_ms`` may stand for ``ratio``). ``options`` are the other :class:`CstarConfig` fields
    (``round_to``, ``min_rank``, ``skip``, ``conv_scheme``, ``leaf_modules``, ``concrete_args``,
    ``autowrap_functions``, ``cost_model``, ``target``, ``param_ratio``). With ``example_inputs`` the plan
    also reports FLOPs.
    ``sensitivity`` (layer name -> weight > 0, e.g. from :func:`cstar_fx.robust.layer_sensitivity`)
    weighs each layer's term in the allocator's objective, so sensitive layers keep more rank.

    Example:
        >>> import torchvision, cstar_fx
        >>> plan = cstar_fx.plan_ranks(torchvision.models.resnet18(), ratio=8)
        >>> round(plan.ratio_params, 1)
        8.0
    """
    if target_speedup is not None and latency_ms is not None:
        raise CstarValueError("pass either target_speedup or latency_ms, not both")
    if (target_speedup is not None or latency_ms is not None) and budget != "latency":
        given = "target_speedup" if target_speedup is not None else "latency_ms"
        raise CstarValueError(f"{given}= is a latency target, but budget={budget!r}: pass "
                              "budget='latency' and target=cstar_fx.latency.LatencyTarget(...) "
                              f"as well, or ask for a {budget} ratio with ratio=")
    if target_speedup is not None:
        ratio = target_speedup
    if latency_ms is not None and (isinstance(latency_ms, bool) or not isinstance(latency_ms, (int, float))
                                   or not latency_ms > 0):
        raise CstarValueError(f"latency_ms must be a positive number of milliseconds, got {latency_ms!r}")
    if not isinstance(ratio, CstarConfig) or budget != "params":
        options = {"budget": budget, **options}
    cfg = resolve_config(ratio, options)
    a = analyse(model, cfg.trace, example_inputs, conv_scheme=cfg.conv_scheme, sensitivity=sensitivity)
    return plan_under(a, cfg, cfg.make_budget(limit=latency_ms))


_PLANNING_OPTIONS = frozenset({"budget", "round_to", "min_rank", "skip", "cost_model", "target",
                                "param_ratio", "objective"})


def transform(model: nn.Module, ratio: float | CstarConfig | None = None, *, plan: RankPlan | None = None,
              example_inputs: Any = None, decompose: bool = True, calibration: Any = None,
              sensitivity: dict[str, float] | None = None, **options: Any) -> fx.GraphModule:
    """Factorize ``model`` at ``ratio`` (default 8) or as ``plan`` says, and return a new GraphModule.

    ``calibration`` (model inputs: a tensor, or an iterable of batches or ``(inputs, labels)`` pairs)
    makes the factorization data-aware: each layer's factors preserve its outputs on those inputs
    (output-PCA SVD, whitened Tucker-2 with a least-squares core) instead of its weights; the ranks
    are still planned from the weights' spectra, which measured better than output-energy spectra
    (docs/robustness.md). A few hundred training images (or adversarial examples of them) are
    enough; full ranks stay exact. ``sensitivity`` is as in
    :func:`plan_ranks` (it only affects planning, so it cannot go with ``plan=``).

    ``decompose=False`` (with ``plan``) builds the factorized architecture with zero factors instead of
    decomposing the weights — for loading saved factor weights into it quickly.
    The input model is not modified. The result's rank plan and report are available through
    :func:`get_plan` and :func:`get_report` (also ``gm.meta["cstar_plan"]`` / ``["cstar_report"]``).

    Example:
        >>> import torch, torchvision, cstar_fx
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> gm = cstar_fx.transform(torch.fx.symbolic_trace(model), ratio=8)
        >>> round(cstar_fx.get_report(gm).ratio_params, 1)
        8.0
    """
    if isinstance(ratio, RankPlan):
        raise CstarTypeError("a rank plan goes by keyword: transform(model, plan=plan)")
    if not isinstance(decompose, bool):
        raise CstarTypeError(f"decompose must be True or False, got {decompose!r}")
    if not decompose and plan is None:
        raise CstarValueError("decompose=False builds the architecture of a given plan; pass plan=... as well")
    if plan is None:
        cfg = resolve_config(CstarConfig.ratio if ratio is None else ratio, options)
    else:  # the plan fixes the ranks; options are still validated so a misspelt one is not silently ignored
        if ratio is not None:
            raise CstarValueError(f"transform(model, {ratio!r}, plan=...): the plan fixes every rank, so the "
                                  "ratio would be ignored; drop the ratio, or drop plan= to plan at that ratio")
        cfg = resolve_options(options)
        planning = sorted(set(options) & _PLANNING_OPTIONS)
        if planning:
            raise CstarValueError(f"option(s) {planning} only steer planning, and plan= fixes the "
                                  "ranks, so they would be ignored; drop them, or edit the plan "
                                  "(plan.with_layer(name, scheme='dense') keeps a layer dense)")
    gm = copy.deepcopy(cfg.trace.trace(model))
    if not decompose and calibration is not None:
        raise CstarValueError("decompose=False builds zero factors, so calibration would be ignored; drop one of them")
    if plan is not None and sensitivity is not None:
        raise CstarValueError("sensitivity only steers planning, and plan= "
                              "fixes the ranks; pass it to plan_ranks instead")
    a = analyse(gm, cfg.trace, example_inputs, conv_scheme=cfg.conv_scheme, need_spectra=plan is None,
                calibration=calibration, sensitivity=sensitivity)
    gm = a.gm  # a new GraphModule when analyse unpacked attention
    if plan is None:
        plan = plan_under(a, cfg, cfg.make_budget())
    else:
        check_plan(plan, a)
    choices = {name: (lp.scheme, lp.ranks) for name, lp in plan.factorized.items()}
    _retarget_metadata_reads(gm, [s for s in a.sites if s.name in choices])
    factorize(gm, a.sites, choices, decompose, a.moments)
    report = build_report(gm, a.sites, plan, dense_params=a.dense_params, params=count_params(gm), with_errors=decompose,
                          dense_flops=a.dense_flops,
                          flops=count_flops(gm, example_inputs) if example_inputs is not None else None)
    gm.meta["cstar_plan"] = plan
    gm.meta["cstar_report"] = report
    return gm


def refold(gm: fx.GraphModule, model: nn.Module, **options: Any) -> fx.GraphModule:
    """The dense counterpart of ``gm`` (a :func:`transform` of ``model``): ``model``'s traced graph carrying
    ``gm``'s weights, each factorized layer's weight set to the product its factors equal and its bias to theirs.

    It computes the same function as ``gm`` (up to rounding), so a trained factorized model can be planned
    and factorized again: ``transform(refold(gm, model), ratio=...)`` re-truncates it (gradual rank reduction
    in :func:`cstar_fx.robust.decompose_finetune`). ``model`` only gives the architecture and is not
    modified; ``options`` are the trace options ``gm`` was made with (``leaf_modules``, ``concrete_args``,
    ``autowrap_functions``, ``unpack_attention``). Raises :class:`PlanMismatchError` when ``gm`` was not made from ``model``.

    Example:
        >>> import torch, torchvision, cstar_fx
        >>> model = torchvision.models.resnet18(num_classes=10).eval()
        >>> gm = cstar_fx.transform(model, ratio=8).eval()
        >>> x = torch.randn(1, 3, 32, 32)
        >>> bool(torch.allclose(refold(gm, model)(x), gm(x), atol=1e-4))
        True
    """
    if not isinstance(gm, fx.GraphModule) or "cstar_plan" not in gm.meta:
        raise CstarTypeError(f"refold needs a model made by cstar_fx.transform (a GraphModule with its rank plan), got "
                             f"{type(gm).__name__}")
    check_trace_options(options, "refold", "the plan of gm")
    plan = get_plan(gm)
    cfg = resolve_options(options)
    a = analyse(copy.deepcopy(cfg.trace.trace(model)), cfg.trace, need_spectra=False)
    dense, sites = a.gm, {s.name: s for s in a.sites}
    folded: set[int] = set()
    with torch.no_grad():
        for name, lp in plan.factorized.items():
            site = sites.get(name)
            if site is None or site.weight_shape != lp.weight_shape:
                found = "no such layer" if site is None else f"its weight is {site.weight_shape}"
                raise PlanMismatchError(f"layer {name!r} of the transformed model has a weight of shape "
                                        f"{lp.weight_shape}, but in the model given {found}: pass the model it "
                                        f"was transformed from (and the same trace options)")
            factors = gm.get_submodule(lp.factor_path)
            site.weight.copy_(dense_weight(factors))
            folded.add(id(site.weight))
            if site.bias is not None:
                site.bias.copy_(factors[-1].bias)
                folded.add(id(site.bias))
        state = gm.state_dict()
        for key, tensor in dense.state_dict(keep_vars=True).items():
            if id(tensor) in folded:
                continue
            if key not in state or state[key].shape != tensor.shape:
                raise PlanMismatchError(f"{key!r} of the model given has no counterpart of shape "
                                        f"{tuple(tensor.shape)} in the transformed model: pass the model it was "
                                        f"transformed from (and the same trace options)")
            tensor.copy_(state[key])
    dense.train(gm.training)
    return dense


def _retarget_metadata_reads(gm: fx.GraphModule, sites: list[LayerSite]) -> None:
    """Point a ``self.fc.weight.dtype`` read of a layer about to be factorized at its future ``expand`` factor's
    weight (same dtype and device): the dense weight it names will no longer exist."""
    for site in sites:
        for node in gm.graph.nodes:
            if (node.op == "get_attr" and str(node.target) == site.param and node.users
                    and all(reads_metadata_only(u) for u in node.users)):
                node.target = f"{factors_path(site)}.expand.weight"
