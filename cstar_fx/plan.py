"""The rank plan: a first-class, inspectable, JSON-serialisable record of what happens to each layer, how one is
assembled from a model's :class:`~cstar_fx.analysis.Analysis` and the chosen schemes and ranks, and how it is
checked against a model before it is applied."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from typing import Any

import torch.fx as fx

from .analysis import Analysis, analyse
from .config import CstarConfig, resolve_options
from .costs import FlopCost, ParamCost
from .errors import CstarKeyError, CstarTypeError, CstarValueError, PlanMismatchError
from .passes.discover import LayerSite
from .schemes import DENSE, LayerSpec, candidates, factor_path, get, names

__all__ = ["LayerPlan", "RankPlan", "Ratios", "PLAN_FORMAT", "assemble", "check_plan", "full_rank_plan", "get_plan"]

PLAN_FORMAT = "cstar-fx/rank-plan/1"
_NUMBER = (int, float)
_LAYER_TYPES: dict[str, Any] = {"name": str, "kind": str, "param": str, "scheme": str, "dense_params": int,
                                "params": int, "dense_flops": (*_NUMBER, type(None)), "flops": (*_NUMBER, type(None)),
                                "energy": _NUMBER, "reason": str, "dense_cost": (*_NUMBER, type(None)),
                                "cost": (*_NUMBER, type(None)), "form": str}
_TYPE_WORDS = {str: "a string", int: "an int", _NUMBER: "a number", (*_NUMBER, type(None)): "a number or null"}


@dataclass(frozen=True)
class LayerPlan:
    """What the plan does with one conv or linear layer.

    ``scheme`` names a registered scheme (:mod:`cstar_fx.schemes`: ``"tucker2"``, ``"svd"``, ``"spatial_svd"``,
    or ``"dense"``, then ``reason`` says why). ``param`` is the fully qualified name of the weight parameter in
    the traced model, and ``form`` how the graph calls the layer: ``"module"`` (an ``nn.Conv2d``/``nn.Linear``)
    or ``"function"`` (``F.conv2d``/``F.linear`` on that parameter); :attr:`factor_path` is where its factors
    live. FLOP fields are ``None`` when the plan was made without example inputs. ``energy`` is the kept
    fraction of the weight's squared Frobenius norm as the allocator scored it: exact for SVD and spatial SVD
    (the kept squared singular values), an estimate for Tucker-2 (the product of its two channel modes' kept
    fractions; the transform report's ``errors`` measure the real weight error).

    Example:
        >>> lp = LayerPlan("fc", "linear", "fc.weight", (10, 64), "svd", (8,), 650, 602)
        >>> lp.factorized
        True
    """

    name: str
    kind: str
    param: str
    weight_shape: tuple[int, ...]
    scheme: str
    ranks: tuple[int, ...]
    dense_params: int
    params: int
    dense_flops: float | None = None
    flops: float | None = None
    energy: float = 1.0
    reason: str = ""
    dense_cost: float | None = None
    cost: float | None = None
    form: str = ""

    def __post_init__(self) -> None:
        # Normalise what callers pass (a list of ranks, numpy ints) to what to_dict/from_dict round-trip,
        # so an edited plan saves and loads like a computed one; a dense layer has no ranks.
        for key in ("weight_shape", "ranks"):
            value = getattr(self, key)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise CstarTypeError(f"layer {self.name!r}: {key} must be a tuple of ints, got {value!r}")
            items = tuple(value)
            if any(isinstance(x, bool) or not hasattr(x, "__index__") for x in items):
                raise CstarTypeError(f"layer {self.name!r}: {key} must be a tuple of ints, got {value!r}")
            object.__setattr__(self, key, tuple(int(x) for x in items))
        if self.ranks and self.scheme in names() and not get(self.scheme).n_ranks:
            object.__setattr__(self, "ranks", ())
        if not self.form:
            # Plans written before the form was recorded: a functional layer is named after its weight.
            object.__setattr__(self, "form", "function" if self.name == self.param else "module")

    @property
    def factorized(self) -> bool:
        """True when the layer is replaced by factors."""
        return get(self.scheme).factorizes

    @property
    def factor_path(self) -> str:
        """Where the layer's factors live in the transformed model (:func:`cstar_fx.schemes.factor_path`)."""
        return factor_path(self.name, self.param, self.form)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        d = asdict(self)
        d["weight_shape"] = list(self.weight_shape)
        d["ranks"] = list(self.ranks)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerPlan":
        """Inverse of :meth:`to_dict`."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise CstarValueError(f"unknown layer-plan fields {sorted(unknown)}; "
                                  "is this a rank plan written by cstar_fx?")
        d = dict(d)
        for key in ("weight_shape", "ranks"):
            if not isinstance(d[key], list) or any(isinstance(x, bool) or not isinstance(x, int) for x in d[key]):
                raise CstarValueError(f"layer {d.get('name')!r}: {key} must be a list of ints, got {d[key]!r}")
            d[key] = tuple(d[key])
        for key, types in _LAYER_TYPES.items():
            if key in d and (isinstance(d[key], bool) or not isinstance(d[key], types)):
                raise CstarValueError(f"layer {d.get('name')!r}: {key} must be {_TYPE_WORDS[types]}, got {d[key]!r}")
        lp = cls(**d)
        n_ranks = get(lp.scheme).n_ranks if lp.scheme in names() else None
        if (lp.kind not in ("conv", "linear") or n_ranks != len(lp.ranks) or min(lp.ranks, default=1) < 1
                or lp.form not in ("module", "function")):
            counts = ", ".join(f"{n} {get(n).n_ranks}" for n in names())
            raise CstarValueError(f"layer {lp.name!r}: kind {lp.kind!r}, form {lp.form!r}, scheme "
                                  f"{lp.scheme!r}, ranks {lp.ranks} is not a valid layer plan (kind "
                                  f"conv/linear; form module/function; ranks per scheme: {counts}; each >= 1)")
        return lp


class Ratios:
    """Dense-over-compressed ratios for anything with ``dense_params``/``params`` and ``dense_flops``/``flops``.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Totals(Ratios):
        ...     dense_params: int = 80
        ...     params: int = 10
        ...     dense_flops: float | None = None
        ...     flops: float | None = None
        >>> Totals().ratio_params, Totals().ratio_flops
        (8.0, None)
    """

    dense_params: int
    params: int
    dense_flops: float | None
    flops: float | None

    @property
    def ratio_params(self) -> float:
        """Parameter ratio (dense / compressed) over the whole model."""
        return self.dense_params / self.params if self.params else math.inf

    @property
    def ratio_flops(self) -> float | None:
        """FLOP ratio on the example input, or ``None`` without one."""
        if self.dense_flops is None or not self.flops:
            return None
        return self.dense_flops / self.flops


@dataclass(frozen=True)
class RankPlan(Ratios):
    """Per-layer schemes and ranks for a model, with dense and compressed costs.

    ``layers`` holds every conv/linear layer found (factorized or not); ``unsupported`` lists the
    layers the pass cannot factorize with the reason. Totals cover the whole model: ``dense_params``
    counts every parameter, ``params`` what remains after the plan is applied.

    Example:
        >>> import torch.nn as nn, cstar_fx
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> plan = cstar_fx.plan_ranks(model, ratio=2)
        >>> plan2 = RankPlan.from_json(plan.to_json())
        >>> plan2 == plan
        True
    """

    layers: dict[str, LayerPlan]
    target_ratio: float | None = None
    budget: str = "params"
    dense_params: int = 0
    params: int = 0
    dense_flops: float | None = None
    flops: float | None = None
    unsupported: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    dense_cost: float | None = None
    cost: float | None = None

    @property
    def factorized(self) -> dict[str, LayerPlan]:
        """The layers the plan replaces by factors."""
        return {k: v for k, v in self.layers.items() if v.factorized}

    def with_layer(self, name: str, **changes: Any) -> "RankPlan":
        """A copy with one layer's entry changed (e.g. ``ranks=(16, 16)``); totals are not recomputed.

        Ranks may be given as a list; ``scheme="dense"`` drops the ranks (a dense layer has none).

        Example:
            >>> import torch.nn as nn, cstar_fx
            >>> plan = cstar_fx.plan_ranks(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)), ratio=2)
            >>> plan.with_layer("0", ranks=(16,)).layers["0"].ranks
            (16,)
        """
        if name not in self.layers:
            raise CstarKeyError(f"no layer {name!r} in the plan; layers are {sorted(self.layers)}")
        if "name" in changes and changes["name"] != name:
            raise CstarValueError(f"with_layer cannot rename layer {name!r}; the layer names come from the model")
        layers = dict(self.layers)
        layers[name] = replace(layers[name], **changes)
        return replace(self, layers=layers)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "format": PLAN_FORMAT,
            "target_ratio": self.target_ratio,
            "budget": self.budget,
            "dense_params": self.dense_params,
            "params": self.params,
            "dense_flops": self.dense_flops,
            "flops": self.flops,
            "unsupported": dict(self.unsupported),
            "options": dict(self.options),
            "dense_cost": self.dense_cost,
            "cost": self.cost,
            "layers": [lp.to_dict() for lp in self.layers.values()],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """Serialise to JSON (round-trips through :meth:`from_json`)."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RankPlan":
        """Inverse of :meth:`to_dict`; raises ``ValueError`` for anything that is not a rank plan."""
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            raise CstarValueError(f"not a cstar_fx rank plan (expected format {PLAN_FORMAT!r})")
        try:
            return cls._from_checked_dict(d)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CstarValueError(f"malformed rank plan ({type(exc).__name__}: {exc}); write plans with "
                                  f"RankPlan.to_json()") from exc

    @classmethod
    def _from_checked_dict(cls, d: dict[str, Any]) -> "RankPlan":
        if not isinstance(d["layers"], list) or not all(isinstance(x, dict) for x in d["layers"]):
            raise CstarValueError("layers must be a list of layer-plan objects")
        for key in ("target_ratio", "dense_flops", "flops", "dense_cost", "cost"):
            value = d.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise CstarValueError(f"{key} must be a number or null, got {value!r}")
        for key in ("unsupported", "options"):
            if not isinstance(d.get(key, {}), dict):
                raise CstarValueError(f"{key} must be an object, got {d[key]!r}")
        if not isinstance(d.get("budget", "params"), str):
            raise CstarValueError(f"budget must be a string, got {d['budget']!r}")
        layers = {lp.name: lp for lp in (LayerPlan.from_dict(x) for x in d["layers"])}
        return cls(layers=layers, target_ratio=d.get("target_ratio"), budget=d.get("budget", "params"),
                   dense_params=int(d.get("dense_params", 0)), params=int(d.get("params", 0)),
                   dense_flops=d.get("dense_flops"), flops=d.get("flops"),
                   unsupported=dict(d.get("unsupported", {})), options=dict(d.get("options", {})),
                   dense_cost=d.get("dense_cost"), cost=d.get("cost"))

    @classmethod
    def from_json(cls, text: str) -> "RankPlan":
        """Parse a plan written by :meth:`to_json`."""
        if not isinstance(text, (str, bytes, bytearray)):
            raise CstarTypeError(f"the JSON object must be str, bytes or bytearray, got {type(text).__name__}; pass "
                                 "the text RankPlan.to_json() wrote (e.g. Path('plan.json').read_text())")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CstarValueError(f"rank plan is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    @classmethod
    def full_rank(cls, model: Any, *, example_inputs: Any = None, **options: Any) -> "RankPlan":
        """Every eligible layer at full rank: ``transform(model, plan=RankPlan.full_rank(model))``
        reproduces the model's outputs (up to float rounding).

        Example:
            >>> import torch, torch.nn as nn, cstar_fx
            >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
            >>> gm = cstar_fx.transform(model, plan=RankPlan.full_rank(model))
            >>> x = torch.randn(2, 3, 8, 8)
            >>> bool(torch.allclose(gm(x), model(x), atol=1e-4))
            True
        """
        return full_rank_plan(model, example_inputs=example_inputs, **options)

    def table(self) -> str:
        """A readable fixed-width table, one row per layer, then the totals."""
        head = f"{'layer':<32} {'scheme':<11} {'shape':<18} {'ranks':<10} {'params':>21} {'energy':>7}"
        rows = [head, "-" * len(head)]
        for lp in self.layers.values():
            shape = "x".join(map(str, lp.weight_shape))
            ranks = ",".join(map(str, lp.ranks)) if lp.ranks else "-"
            params = f"{lp.dense_params:,} -> {lp.params:,}"
            extra = f"  ({lp.reason})" if lp.reason else ""
            rows.append(f"{lp.name[:32]:<32} {lp.scheme:<11} {shape:<18} {ranks:<10} {params:>21} {lp.energy:>7.3f}{extra}")
        for name, why in self.unsupported.items():
            rows.append(f"{name[:32]:<32} {DENSE:<11} {'':<18} {'-':<10} {'':>21} {'':>7}  (unsupported: {why})")
        rows.append("-" * len(head))
        total = f"params {self.dense_params:,} -> {self.params:,} ({self.ratio_params:.2f}x"
        total += f", target {self.target_ratio:g}x by {self.budget})" if self.target_ratio else ")"
        if self.ratio_flops is not None:
            total += f"; FLOPs {self.dense_flops:,.0f} -> {self.flops:,.0f} ({self.ratio_flops:.2f}x)"
        if self.budget not in ("params", "flops", "full-rank") and self.cost:
            total += f"; {self.budget} {self.dense_cost:.4g} -> {self.cost:.4g} ({self.dense_cost / self.cost:.2f}x predicted)"
        rows.append(total)
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


def _layer_plan(site: LayerSite, spec: LayerSpec, scheme: str, ranks: tuple[int, ...], reason: str) -> LayerPlan:
    params, flops = ParamCost(), FlopCost()
    has_shapes = spec.in_positions is not None
    energy = get(scheme).energy(spec, ranks) if spec.spectra else 1.0
    return LayerPlan(
        name=site.name, kind=site.kind, param=site.param, weight_shape=site.weight_shape, scheme=scheme,
        ranks=ranks, dense_params=int(params(spec, DENSE, ())), params=int(params(spec, scheme, ranks)),
        dense_flops=flops(spec, DENSE, ()) if has_shapes else None,
        flops=flops(spec, scheme, ranks) if has_shapes else None, energy=energy, reason=reason, form=site.form)


def assemble(a: Analysis, choices: dict[str, tuple[str, tuple[int, ...]]], reasons: dict[str, str],
             cfg: CstarConfig | None = None, *, layer_costs: dict[str, tuple[float, float]] | None = None,
             dense_cost: float | None = None, cost: float | None = None, ratio: float | None = None) -> RankPlan:
    """The plan for the analysed model: each layer's ``(scheme, ranks)`` from ``choices`` (dense where absent, with
    its reason from ``reasons``), parameter and FLOP counts, and the budget's costs when a budget chose them.
    ``cfg`` is recorded in the plan's options (``None``: a full-rank plan, made without a budget).

    Example:
        >>> import torch.nn as nn
        >>> from cstar_fx.analysis import TraceConfig
        >>> a = analyse(nn.Sequential(nn.Linear(8, 8)), TraceConfig())
        >>> assemble(a, {"0": ("svd", (2,))}, {}).params
        40
    """
    layer_costs = layer_costs or {}
    layers: dict[str, LayerPlan] = {}
    for site in a.sites:
        scheme, ranks = choices.get(site.name, (DENSE, ()))
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
        if cfg.objective != "log_energy":
            options["objective"] = cfg.objective
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


def full_rank_plan(model: Any, *, example_inputs: Any = None, **options: Any) -> RankPlan:
    """Every eligible layer at full rank (see :meth:`RankPlan.full_rank`).

    Example:
        >>> import torch.nn as nn
        >>> plan = full_rank_plan(nn.Sequential(nn.Linear(6, 4)))
        >>> plan.layers["0"].ranks
        (4,)
    """
    cfg = resolve_options(options)
    a = analyse(model, cfg.trace, example_inputs, need_spectra=False)
    choices = {}
    for spec in a.eligible:
        scheme = candidates(spec, cfg.conv_scheme)[0]
        choices[spec.name] = (scheme.name, scheme.max_ranks(spec))
    return assemble(a, choices, dict(a.skipped))


def check_plan(plan: RankPlan, a: Analysis) -> None:
    """Raise :class:`~cstar_fx.errors.PlanMismatchError` unless ``plan`` fits the analysed model: every factorized
    layer exists there with the plan's weight shape, its scheme applies to it, and its ranks are within limits.

    Example:
        >>> import torch.nn as nn
        >>> from cstar_fx.analysis import TraceConfig
        >>> model = nn.Sequential(nn.Linear(6, 4))
        >>> check_plan(full_rank_plan(model), analyse(model, TraceConfig(), need_spectra=False))
    """
    if not isinstance(plan, RankPlan):
        raise CstarTypeError(f"plan must be a cstar_fx.RankPlan, got {type(plan).__name__}")
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
        scheme = get(lp.scheme)
        if not scheme.applies(a.specs[name]):
            problems.append(f"layer {name!r}: {lp.scheme} does not apply to this {site.kind} layer "
                            f"(weight shape {site.weight_shape})")
            continue
        top = scheme.max_ranks(a.specs[name])
        if len(lp.ranks) != len(top) or any(not 1 <= r <= t for r, t in zip(lp.ranks, top)):
            problems.append(f"layer {name!r}: ranks {lp.ranks} outside 1..{top} for scheme {lp.scheme}")
    if problems:
        raise PlanMismatchError("the rank plan does not match this model:\n  " + "\n  ".join(problems)
                                + "\nMake the plan from this model: plan_ranks(model, ...).")


def get_plan(gm: fx.GraphModule) -> RankPlan:
    """The rank plan a GraphModule was transformed with.

    Example:
        >>> import cstar_fx, torch.nn as nn
        >>> gm = cstar_fx.transform(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)), ratio=2)
        >>> get_plan(gm).layers["0"].scheme
        'svd'
    """
    try:
        return gm.meta["cstar_plan"]
    except (AttributeError, KeyError):
        raise CstarValueError("this module was not produced by cstar_fx.transform (no rank plan attached)") from None
