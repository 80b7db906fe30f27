"""The rank plan: a first-class, inspectable, JSON-serialisable record of what happens to each layer."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

__all__ = ["LayerPlan", "RankPlan", "Ratios", "PLAN_FORMAT"]

PLAN_FORMAT = "cstar-fx/rank-plan/1"
_N_RANKS = {"dense": 0, "svd": 1, "tucker2": 2}
_NUMBER = (int, float)
_LAYER_TYPES: dict[str, Any] = {"name": str, "kind": str, "param": str, "scheme": str, "dense_params": int,
                                "params": int, "dense_flops": (*_NUMBER, type(None)), "flops": (*_NUMBER, type(None)),
                                "energy": _NUMBER, "reason": str, "dense_cost": (*_NUMBER, type(None)),
                                "cost": (*_NUMBER, type(None))}
_TYPE_WORDS = {str: "a string", int: "an int", _NUMBER: "a number", (*_NUMBER, type(None)): "a number or null"}


@dataclass(frozen=True)
class LayerPlan:
    """What the plan does with one conv or linear layer.

    ``scheme`` is ``"tucker2"``, ``"svd"`` or ``"dense"`` (then ``reason`` says why). ``param`` is the
    fully qualified name of the weight parameter in the traced model. FLOP fields are ``None`` when
    the plan was made without example inputs. ``energy`` is the kept fraction of the weight's squared
    Frobenius norm (exact, measured on the factorized weight).

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

    def __post_init__(self) -> None:
        # Normalise what callers pass (a list of ranks, numpy ints) to what to_dict/from_dict round-trip,
        # so an edited plan saves and loads like a computed one; a dense layer has no ranks.
        for key in ("weight_shape", "ranks"):
            value = getattr(self, key)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise TypeError(f"layer {self.name!r}: {key} must be a tuple of ints, got {value!r}")
            items = tuple(value)
            if any(isinstance(x, bool) or not hasattr(x, "__index__") for x in items):
                raise TypeError(f"layer {self.name!r}: {key} must be a tuple of ints, got {value!r}")
            object.__setattr__(self, key, tuple(int(x) for x in items))
        if self.scheme == "dense" and self.ranks:
            object.__setattr__(self, "ranks", ())

    @property
    def factorized(self) -> bool:
        """True when the layer is replaced by factors."""
        return self.scheme != "dense"

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
            raise ValueError(f"unknown layer-plan fields {sorted(unknown)}; is this a rank plan written by cstar_fx?")
        d = dict(d)
        for key in ("weight_shape", "ranks"):
            if not isinstance(d[key], list) or any(isinstance(x, bool) or not isinstance(x, int) for x in d[key]):
                raise ValueError(f"layer {d.get('name')!r}: {key} must be a list of ints, got {d[key]!r}")
            d[key] = tuple(d[key])
        for key, types in _LAYER_TYPES.items():
            if key in d and (isinstance(d[key], bool) or not isinstance(d[key], types)):
                raise ValueError(f"layer {d.get('name')!r}: {key} must be {_TYPE_WORDS[types]}, got {d[key]!r}")
        lp = cls(**d)
        if lp.kind not in ("conv", "linear") or _N_RANKS.get(lp.scheme) != len(lp.ranks) or min(lp.ranks, default=1) < 1:
            raise ValueError(f"layer {lp.name!r}: kind {lp.kind!r}, scheme {lp.scheme!r}, ranks {lp.ranks} is not a "
                             f"valid layer plan (kind conv/linear; dense has no ranks, svd 1, tucker2 2, each >= 1)")
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
            raise KeyError(f"no layer {name!r} in the plan; layers are {sorted(self.layers)}")
        if "name" in changes and changes["name"] != name:
            raise ValueError(f"with_layer cannot rename layer {name!r}; the layer names come from the model")
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
            raise ValueError(f"not a cstar_fx rank plan (expected format {PLAN_FORMAT!r})")
        try:
            return cls._from_checked_dict(d)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"malformed rank plan ({type(exc).__name__}: {exc}); write plans with "
                             f"RankPlan.to_json()") from exc

    @classmethod
    def _from_checked_dict(cls, d: dict[str, Any]) -> "RankPlan":
        if not isinstance(d["layers"], list) or not all(isinstance(x, dict) for x in d["layers"]):
            raise ValueError("layers must be a list of layer-plan objects")
        for key in ("target_ratio", "dense_flops", "flops", "dense_cost", "cost"):
            value = d.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{key} must be a number or null, got {value!r}")
        for key in ("unsupported", "options"):
            if not isinstance(d.get(key, {}), dict):
                raise ValueError(f"{key} must be an object, got {d[key]!r}")
        if not isinstance(d.get("budget", "params"), str):
            raise ValueError(f"budget must be a string, got {d['budget']!r}")
        layers = {lp.name: lp for lp in (LayerPlan.from_dict(x) for x in d["layers"])}
        return cls(layers=layers, target_ratio=d.get("target_ratio"), budget=d.get("budget", "params"),
                   dense_params=int(d.get("dense_params", 0)), params=int(d.get("params", 0)),
                   dense_flops=d.get("dense_flops"), flops=d.get("flops"),
                   unsupported=dict(d.get("unsupported", {})), options=dict(d.get("options", {})),
                   dense_cost=d.get("dense_cost"), cost=d.get("cost"))

    @classmethod
    def from_json(cls, text: str) -> "RankPlan":
        """Parse a plan written by :meth:`to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"rank plan is not valid JSON: {exc}") from exc
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
        from .api import full_rank_plan

        return full_rank_plan(model, example_inputs=example_inputs, **options)

    def table(self) -> str:
        """A readable fixed-width table, one row per layer, then the totals."""
        head = f"{'layer':<32} {'scheme':<8} {'shape':<18} {'ranks':<10} {'params':>21} {'energy':>7}"
        rows = [head, "-" * len(head)]
        for lp in self.layers.values():
            shape = "x".join(map(str, lp.weight_shape))
            ranks = ",".join(map(str, lp.ranks)) if lp.ranks else "-"
            params = f"{lp.dense_params:,} -> {lp.params:,}"
            extra = f"  ({lp.reason})" if lp.reason else ""
            rows.append(f"{lp.name[:32]:<32} {lp.scheme:<8} {shape:<18} {ranks:<10} {params:>21} {lp.energy:>7.3f}{extra}")
        for name, why in self.unsupported.items():
            rows.append(f"{name[:32]:<32} {'dense':<8} {'':<18} {'-':<10} {'':>21} {'':>7}  (unsupported: {why})")
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
