"""The public verbs: ``plan_ranks`` (read-only) and ``transform`` (plan, then rewrite a private copy)."""

from __future__ import annotations

import copy
import fnmatch
import math
from dataclasses import asdict, dataclass, is_dataclass, replace
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .allocate import Cap, UnreachableBudgetError, _energy, allocate, max_ranks, scheme_for
from .config import CstarConfig, resolve_config
from .costs import CostModel, FlopCost, LayerSpec, ParamCost, cost_model_for
from .decompose import mode_spectra
from .passes.attention import unpack_attention
from .passes.calibrate import input_moments
from .passes.discover import LayerSite, find_layers, reads_metadata_only
from .passes.factorize import factorize, factors_path
from .passes.shapes import as_tuple, eval_mode, record_shapes
from .passes.trace import trace
from .plan import LayerPlan, RankPlan
from .report import TransformReport, build_report

__all__ = ["plan_ranks", "transform", "full_rank_plan", "get_plan", "get_report", "PlanMismatchError",
           "NoEligibleLayerError"]


class PlanMismatchError(ValueError):
    """A rank plan does not fit the model it is applied to.

    Example:
        >>> isinstance(PlanMismatchError("x"), ValueError)
        True
    """


class NoEligibleLayerError(ValueError):
    """The model has no conv/linear layer that can be factorized.

    Example:
        >>> isinstance(NoEligibleLayerError("x"), ValueError)
        True
    """


@dataclass
class _Analysis:
    gm: fx.GraphModule
    sites: list[LayerSite]
    unsupported: dict[str, str]
    specs: dict[str, LayerSpec]
    skipped: dict[str, str]
    dense_params: int
    dense_flops: float | None
    moments: dict[str, torch.Tensor]


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, example_inputs: Any) -> float:
    """FLOPs of one forward pass on ``example_inputs`` (``torch.utils.flop_counter``, eval mode).

    Example:
        >>> count_flops(nn.Linear(4, 2, bias=False), torch.randn(1, 4))
        16.0
    """
    # nn.MultiheadAttention's fused inference path hides its matmuls from the counter; count the plain path.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), eval_mode(model), FlopCounterMode(display=False) as counter:
            model(*as_tuple(example_inputs))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return float(counter.get_total_flops())


def _positions(shape: tuple[int, ...], kind: str) -> int:
    if not shape:
        return 0
    if kind == "conv":
        n = 1
        for d in (shape[:-3] + shape[-2:]):  # batch (if any) and spatial, not channels
            n *= d
        return n
    n = 1
    for d in shape[:-1]:
        n *= d
    return n


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[-1]))


def _skip_reason(name: str, patterns: tuple[str, ...]) -> str | None:
    for pat in patterns:
        if name == pat or fnmatch.fnmatchcase(name, pat):
            return f"skipped (matches {pat!r})"
    return None


def _hidden_layers(gm: fx.GraphModule, known: dict[str, str]) -> dict[str, str]:
    """Conv/linear layers inside modules the graph calls opaquely (leaves): listed, so the plan and report
    account for every layer and advice can name the leaf that hides them."""
    hidden: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        leaf = str(node.target)
        mod = gm.get_submodule(leaf)
        if isinstance(mod, (nn.Conv2d, nn.Linear)) or leaf in known:
            continue
        for sub, child in mod.named_modules():
            name = f"{leaf}.{sub}" if sub else leaf
            if sub and isinstance(child, (nn.Conv2d, nn.Linear)) and name not in known and name not in hidden:
                hidden[name] = (f"hidden inside {leaf!r} ({type(mod).__name__}), which is called as a leaf "
                                f"(leaf_modules=, a registered or timm leaf), so it is not factorized; drop that "
                                f"module from the leaves to factorize it")
    return hidden


def _check_skip(skip: tuple[str, ...], names: list[str]) -> None:
    unmatched = [pat for pat in skip if not any(_skip_reason(n, (pat,)) for n in names)]
    if unmatched:
        shown = ", ".join(repr(n) for n in names[:8]) + (" ..." if len(names) > 8 else "")
        raise ValueError(f"skip pattern(s) {unmatched} match no layer of this model, so they would skip nothing; "
                         f"the layers are named {shown or 'nothing'} (a wrapped model's names carry its prefix, "
                         f"e.g. 'model.conv1' or '*conv1')")


def _check_devices(model: nn.Module) -> None:
    """Factorizing needs real values on one device: reject meta tensors and models split across devices."""
    where: dict[torch.device, str] = {}
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        where.setdefault(t.device, name)
    meta = ("; tensors on the meta device have no values: materialise them first, e.g. "
            "model.to_empty(device='cpu') then model.load_state_dict(weights)")
    if len(where) > 1:
        found = ", ".join(f"{name!r} on {dev}" for dev, name in where.items())
        raise ValueError(f"the model's tensors are on several devices ({found}); move the whole model to one device "
                         f"first, e.g. model.to('cpu') or model.to('cuda')" + (meta if torch.device("meta") in where else ""))
    if torch.device("meta") in where:
        raise ValueError("the model is on the meta device and has no values to factorize" + meta)


def _check_sensitivity(sensitivity: Any, sites: list[LayerSite]) -> dict[str, float]:
    if sensitivity is None:
        return {}
    if not isinstance(sensitivity, dict):
        raise TypeError(f"sensitivity must be a dict of layer name -> positive weight "
                        f"(e.g. from cstar_fx.robust.layer_sensitivity), got {type(sensitivity).__name__}")
    names = {s.name for s in sites}  # a skipped layer's weight is simply unused
    unknown = sorted(set(sensitivity) - names)
    if unknown:
        raise ValueError(f"sensitivity names layers that are not factorizable layers of this model: {unknown[:5]}; "
                         f"measure it on this model with cstar_fx.robust.layer_sensitivity(model, ...)")
    bad = {k: v for k, v in sensitivity.items()
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0}
    if bad:
        raise ValueError(f"sensitivity weights must be finite numbers > 0, got {dict(list(bad.items())[:3])}")
    return {k: float(v) for k, v in sensitivity.items()}


def _analyse(model: nn.Module, cfg: CstarConfig, example_inputs: Any, need_spectra: bool = True,
             calibration: Any = None, sensitivity: dict[str, float] | None = None) -> _Analysis:
    if cfg.unpack_attention:
        model = unpack_attention(model)
    gm = trace(model, leaf_modules=cfg.leaf_modules, concrete_args=cfg.concrete_args,
               autowrap_functions=cfg.autowrap_functions)
    _check_devices(gm)
    sites, unsupported = find_layers(gm)
    for site in [s for s in sites if s.weight.numel() == 0]:
        unsupported[site.name] = f"weight of shape {site.weight_shape} has no entries (a zero-width layer); kept dense"
        sites.remove(site)
    unsupported.update(_hidden_layers(gm, unsupported))
    _check_skip(cfg.skip, [s.name for s in sites] + list(unsupported))
    shapes = record_shapes(gm, example_inputs, {n for s in sites for n in s.nodes}) if example_inputs is not None else {}
    eligible = [s for s in sites if not _skip_reason(s.name, cfg.skip)]
    importance = _check_sensitivity(sensitivity, sites)
    moments = input_moments(gm, eligible, calibration) if calibration is not None else {}
    specs: dict[str, LayerSpec] = {}
    skipped: dict[str, str] = {}
    for site in sites:
        why = _skip_reason(site.name, cfg.skip)
        if why:
            skipped[site.name] = why
        spectra = ()
        if need_spectra and not why:
            try:
                spectra = mode_spectra(site.weight)
            except ValueError as exc:
                raise ValueError(f"layer {site.name!r}: {exc}") from exc
        p_in = p_out = in_shape = out_shape = None
        if shapes:
            p_in = sum(_positions(shapes[n][0], site.kind) for n in site.nodes)
            p_out = sum(_positions(shapes[n][1], site.kind) for n in site.nodes)
            in_shape, out_shape = shapes[site.nodes[0]]
        specs[site.name] = LayerSpec(site.name, site.kind, site.weight_shape, site.bias is not None, spectra, p_in, p_out,
                                     in_shape, out_shape, _pair(site.stride), site.padding if isinstance(site.padding, str)
                                     else _pair(site.padding), _pair(site.dilation), importance.get(site.name, 1.0))
    flops = count_flops(gm, example_inputs) if example_inputs is not None else None
    return _Analysis(gm, sites, unsupported, specs, skipped, _count_params(gm), flops, moments)


def _layer_plan(site: LayerSite, spec: LayerSpec, scheme: str, ranks: tuple[int, ...], reason: str) -> LayerPlan:
    params, flops = ParamCost(), FlopCost()
    has_shapes = spec.in_positions is not None
    energy = _energy(spec, scheme, ranks) if scheme != "dense" and spec.spectra else 1.0
    return LayerPlan(
        name=site.name, kind=site.kind, param=site.param, weight_shape=site.weight_shape, scheme=scheme,
        ranks=ranks, dense_params=int(params(spec, "dense", ())), params=int(params(spec, scheme, ranks)),
        dense_flops=flops(spec, "dense", ()) if has_shapes else None,
        flops=flops(spec, scheme, ranks) if has_shapes else None, energy=energy, reason=reason)


def _assemble(a: _Analysis, choices: dict[str, tuple[str, tuple[int, ...]]], reasons: dict[str, str],
              cfg: CstarConfig | None, costs: tuple[dict[str, tuple[float, float]], float, float, float] | None = None
              ) -> RankPlan:
    layer_costs, dense_cost, cost, ratio = costs if costs is not None else ({}, None, None, None)
    layers: dict[str, LayerPlan] = {}
    for site in a.sites:
        scheme, ranks = choices.get(site.name, ("dense", ()))
        lp = _layer_plan(site, a.specs[site.name], scheme, ranks, reasons.get(site.name, ""))
        if site.name in layer_costs:
            lp = replace(lp, dense_cost=layer_costs[site.name][0], cost=layer_costs[site.name][1])
        layers[site.name] = lp
    saved = sum(lp.dense_params - lp.params for lp in layers.values())
    flops = None
    if a.dense_flops is not None:
        flops = a.dense_flops - sum(lp.dense_flops - lp.flops for lp in layers.values())
    options = {}
    if cfg is not None:
        options = {"round_to": cfg.round_to, "min_rank": cfg.min_rank, "skip": list(cfg.skip),
                   "conv_scheme": cfg.conv_scheme}
        if cfg.param_ratio is not None:
            options["param_ratio"] = cfg.param_ratio
        if cfg.target is not None:
            options["target"] = asdict(cfg.target) if is_dataclass(cfg.target) else repr(cfg.target)
        if cfg.unpack_attention:  # the layer names refer to the unpacked model: applying the plan needs it too
            options["unpack_attention"] = True
        if any(spec.importance != 1.0 for spec in a.specs.values()):
            options["sensitivity"] = {n: spec.importance for n, spec in a.specs.items() if spec.importance != 1.0}
    return RankPlan(layers=layers, target_ratio=ratio if ratio is not None else (cfg.ratio if cfg else None),
                    budget=cfg.budget_name if cfg else "full-rank", dense_params=a.dense_params,
                    params=a.dense_params - saved, dense_flops=a.dense_flops, flops=flops,
                    unsupported=dict(a.unsupported), options=options, dense_cost=dense_cost, cost=cost)


def _budget_cost(cfg: CstarConfig, example_inputs: Any) -> CostModel:
    if cfg.cost_model is not None:
        return cfg.cost_model
    if cfg.budget in ("flops", "latency") and example_inputs is None:
        raise ValueError(f"budget={cfg.budget!r} needs example_inputs for the layer shapes; pass e.g. "
                         "example_inputs=torch.randn(1, 3, 32, 32)")
    if cfg.budget == "latency":
        from .latency import LatencyCost

        return LatencyCost(cfg.target)
    return cost_model_for(cfg.budget)


def _more_layers_advice(a: _Analysis) -> str:
    """Where more factorizable layers could come from, for this model (not a generic list)."""
    ways = []
    if a.skipped:
        ways.append(f"remove {sorted(a.skipped)[:5]} from skip=")
    leaves = sorted({why.split("'")[1] for why in a.unsupported.values() if why.startswith("hidden inside")})
    if leaves:
        ways.append(f"stop calling {leaves[:5]} as leaves, which hides the layers inside them")
    return (" To factorize more layers: " + "; or ".join(ways) + ".") if ways else ""


def _plan(a: _Analysis, cfg: CstarConfig, example_inputs: Any, latency_ms: float | None = None) -> RankPlan:
    eligible = [a.specs[s.name] for s in a.sites if s.name not in a.skipped]
    if not eligible:
        found = ", ".join(f"{k}: {v}" for k, v in {**a.skipped, **a.unsupported}.items()) or "none"
        raise NoEligibleLayerError(
            "the model has no conv2d/linear layer that can be factorized (found: " + found + "). "
            "Remove layers from skip=, or mark blocks that hide layers as non-leaf.")
    cost = _budget_cost(cfg, example_inputs)
    layer_dense = sum(cost(s, "dense", ()) for s in eligible)
    if cfg.cost_model is None and cfg.budget == "flops":
        total = a.dense_flops
    elif cfg.cost_model is None and cfg.budget == "params":
        total = float(a.dense_params)
    elif hasattr(cost, "model_cost") and example_inputs is not None:
        total = max(cost.model_cost(a.gm, example_inputs), layer_dense)
    else:
        total = layer_dense  # a custom cost without a whole-model measure covers the eligible layers only
    fixed = total - layer_dense
    ratio = cfg.ratio if latency_ms is None else total / latency_ms
    if ratio <= 1:
        raise ValueError(f"latency_ms={latency_ms:g} is not below the dense model's {total:.4g} ms; ask for less")
    caps = ()
    if cfg.param_ratio is not None:
        params = ParamCost()
        fixed_params = a.dense_params - sum(params(s, "dense", ()) for s in eligible)
        caps = (Cap(params, fixed_params, a.dense_params / cfg.param_ratio),)
    try:
        alloc = allocate(eligible, cost, ratio=ratio, fixed_cost=fixed, round_to=cfg.round_to,
                         min_rank=cfg.min_rank, conv_scheme=cfg.conv_scheme, caps=caps)
    except UnreachableBudgetError as exc:
        raise UnreachableBudgetError(str(exc) + _more_layers_advice(a), max_ratio=exc.max_ratio) from None
    reasons = dict(a.skipped)
    for name, (scheme, _) in alloc.choices.items():
        if scheme == "dense":
            reasons[name] = "factorized form would cost at least the dense layer"
    layer_costs = {s.name: (cost(s, "dense", ()), cost(s, *alloc.choices[s.name])) for s in eligible}
    if hasattr(cost, "table") and hasattr(cost.table, "save"):
        cost.table.save()  # keep what was measured, so the next plan on this target measures nothing
    return _assemble(a, alloc.choices, reasons, cfg, costs=(layer_costs, total, alloc.total_cost, ratio))


def plan_ranks(model: nn.Module, ratio: float | CstarConfig = 8, *, budget: str = "params",
               example_inputs: Any = None, target_speedup: float | None = None, latency_ms: float | None = None,
               sensitivity: dict[str, float] | None = None, **options: Any) -> RankPlan:
    """Choose per-layer schemes and ranks under one global budget. Never modifies ``model``.

    ``ratio`` is dense cost / compressed cost for the whole model; ``budget`` is ``"params"``,
    ``"flops"`` or ``"latency"`` (measured on ``target=LatencyTarget(...)``; then ``target_speedup`` or
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
        raise ValueError("pass either target_speedup or latency_ms, not both")
    if (target_speedup is not None or latency_ms is not None) and budget != "latency":
        given = "target_speedup" if target_speedup is not None else "latency_ms"
        raise ValueError(f"{given}= is a latency target, but budget={budget!r}: pass budget='latency' and "
                         f"target=cstar_fx.latency.LatencyTarget(...) as well, or ask for a {budget} ratio with ratio=")
    if target_speedup is not None:
        ratio = target_speedup
    if latency_ms is not None:
        if isinstance(latency_ms, bool) or not isinstance(latency_ms, (int, float)) or not latency_ms > 0:
            raise ValueError(f"latency_ms must be a positive number of milliseconds, got {latency_ms!r}")
        ratio = 2.0  # placeholder, replaced by the measured dense latency / latency_ms
    if not isinstance(ratio, CstarConfig) or budget != "params":
        options = {"budget": budget, **options}
    cfg = resolve_config(ratio, options)
    a = _analyse(model, cfg, example_inputs, sensitivity=sensitivity)
    return _plan(a, cfg, example_inputs, latency_ms=latency_ms)


def full_rank_plan(model: nn.Module, *, example_inputs: Any = None, **options: Any) -> RankPlan:
    """Every eligible layer at full rank (see :meth:`RankPlan.full_rank`).

    Example:
        >>> plan = full_rank_plan(nn.Sequential(nn.Linear(6, 4)))
        >>> plan.layers["0"].ranks
        (4,)
    """
    cfg = resolve_config(2.0, options)
    a = _analyse(model, cfg, example_inputs, need_spectra=False)
    choices = {}
    for site in a.sites:
        if site.name in a.skipped:
            continue
        scheme = scheme_for(a.specs[site.name], cfg.conv_scheme)
        choices[site.name] = (scheme, max_ranks(a.specs[site.name], scheme))
    return _assemble(a, choices, dict(a.skipped), None)


def _check_plan(plan: RankPlan, a: _Analysis) -> None:
    if not isinstance(plan, RankPlan):
        raise TypeError(f"plan must be a cstar_fx.RankPlan, got {type(plan).__name__}")
    sites = {s.name: s for s in a.sites}
    problems = []
    for name, lp in plan.factorized.items():
        site = sites.get(name)
        if site is None:
            problems.append(f"layer {name!r} is not a factorizable layer of this model")
            continue
        if site.weight_shape != lp.weight_shape:
            problems.append(f"layer {name!r} has weight shape {site.weight_shape}, the plan expects {lp.weight_shape}")
            continue
        if lp.scheme == "tucker2" and site.kind != "conv":
            problems.append(f"layer {name!r}: tucker2 needs a conv layer")
            continue
        top = max_ranks(a.specs[name], lp.scheme)
        if len(lp.ranks) != len(top) or any(not 1 <= r <= t for r, t in zip(lp.ranks, top)):
            problems.append(f"layer {name!r}: ranks {lp.ranks} outside 1..{top} for scheme {lp.scheme}")
    if problems:
        raise PlanMismatchError("the rank plan does not match this model:\n  " + "\n  ".join(problems)
                                + "\nMake the plan from this model: plan_ranks(model, ...).")


_PLANNING_OPTIONS = frozenset({"budget", "round_to", "min_rank", "skip", "cost_model", "target",
                                "param_ratio"})


def transform(model: nn.Module, ratio: float | CstarConfig | None = 8, *, plan: RankPlan | None = None,
              example_inputs: Any = None, decompose: bool = True, calibration: Any = None,
              sensitivity: dict[str, float] | None = None, **options: Any) -> fx.GraphModule:
    """Factorize ``model`` at ``ratio`` (or as ``plan`` says) and return a new GraphModule.

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
        raise TypeError("a rank plan goes by keyword: transform(model, plan=plan)")
    if not isinstance(decompose, bool):
        raise TypeError(f"decompose must be True or False, got {decompose!r}")
    if not decompose and plan is None:
        raise ValueError("decompose=False builds the architecture of a given plan; pass plan=... as well")
    if plan is None:
        cfg = resolve_config(8 if ratio is None else ratio, options)
    else:  # the plan fixes the ranks; options are still validated so a misspelt one is not silently ignored
        if isinstance(ratio, CstarConfig) or (ratio is not None and not (type(ratio) is int and ratio == 8)):
            # 8 is the signature's default, which callers forwarding their own default pass along
            raise ValueError(f"transform(model, {ratio!r}, plan=...): the plan fixes every rank, so the ratio would "
                             f"be ignored; drop the ratio, or drop plan= to plan at that ratio")
        cfg = resolve_config(2.0, options)
        planning = sorted(set(options) & _PLANNING_OPTIONS)
        if planning:
            raise ValueError(f"option(s) {planning} only steer planning, and plan= fixes the ranks, so they would be "
                             f"ignored; drop them, or edit the plan (plan.with_layer(name, scheme='dense') keeps "
                             f"a layer dense)")
    source = trace(model, leaf_modules=cfg.leaf_modules, concrete_args=cfg.concrete_args,
                   autowrap_functions=cfg.autowrap_functions)
    gm = copy.deepcopy(source)
    if not decompose and calibration is not None:
        raise ValueError("decompose=False builds zero factors, so calibration would be ignored; drop one of them")
    if plan is not None and sensitivity is not None:
        raise ValueError("sensitivity only steers planning, and plan= fixes the ranks; pass it to plan_ranks instead")
    a = _analyse(gm, cfg, example_inputs, need_spectra=plan is None, calibration=calibration, sensitivity=sensitivity)
    gm = a.gm  # a new GraphModule when _analyse unpacked attention
    if plan is None:
        plan = _plan(a, cfg, example_inputs)
    else:
        _check_plan(plan, a)
    choices = {name: (lp.scheme, lp.ranks) for name, lp in plan.factorized.items()}
    _retarget_metadata_reads(gm, [s for s in a.sites if s.name in choices])
    factorize(gm, a.sites, choices, decompose, a.moments)
    report = build_report(gm, a.sites, plan, dense_params=a.dense_params, params=_count_params(gm), with_errors=decompose,
                          dense_flops=a.dense_flops,
                          flops=count_flops(gm, example_inputs) if example_inputs is not None else None)
    gm.meta["cstar_plan"] = plan
    gm.meta["cstar_report"] = report
    return gm


def _retarget_metadata_reads(gm: fx.GraphModule, sites: list[LayerSite]) -> None:
    """Point a ``self.fc.weight.dtype`` read of a layer about to be factorized at its future ``expand`` factor's
    weight (same dtype and device): the dense weight it names will no longer exist."""
    for site in sites:
        for node in gm.graph.nodes:
            if (node.op == "get_attr" and str(node.target) == site.param and node.users
                    and all(reads_metadata_only(u) for u in node.users)):
                node.target = f"{factors_path(site)}.expand.weight"


def get_plan(gm: fx.GraphModule) -> RankPlan:
    """The rank plan a GraphModule was transformed with.

    Example:
        >>> gm = transform(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)), ratio=2)
        >>> get_plan(gm).layers["0"].scheme
        'svd'
    """
    try:
        return gm.meta["cstar_plan"]
    except (AttributeError, KeyError):
        raise ValueError("this module was not produced by cstar_fx.transform (no rank plan attached)") from None


def get_report(gm: fx.GraphModule) -> TransformReport:
    """The transform report (achieved ratios, factorized and dense layers with reasons).

    Example:
        >>> gm = transform(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)), ratio=2)
        >>> get_report(gm).ratio_params >= 2
        True
    """
    try:
        return gm.meta["cstar_report"]
    except (AttributeError, KeyError):
        raise ValueError("this module was not produced by cstar_fx.transform (no report attached)") from None
