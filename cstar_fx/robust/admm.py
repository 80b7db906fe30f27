"""CSTAR's ADMM proximity term: pull every factorizable weight towards its budget-constrained low-rank projection.

For each weight ``W`` the plan factorizes, the training loss gains ``rho/2 * ||W - Z + U||^2`` where
``Z = project(W + U, ranks)`` (the projection of the layer's scheme: Tucker-2, SVD or spatial SVD) at the
ranks the global allocator chose, and ``U`` is the scaled dual variable. At each refresh (every ``refresh_every``
steps, or once per epoch by default) the allocator can be re-run on ``W + U`` (``replan``: the
allocator as the projection; with ``AdmmConfig(projection="euclidean")`` it minimises the discarded energy
in absolute terms, which makes it the Euclidean projection onto the budget), then ``Z`` is recomputed and
``U += W - Z``. The primal residual ``||W - Z||`` is recorded at each refresh: it falls as W becomes low-rank
at the planned ranks.

Example:
    >>> import torch, torch.nn as nn, cstar_fx
    >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    >>> admm = Admm(model, cstar_fx.plan_ranks(model, ratio=2), AdmmConfig(rho=0.1, replan=False))
    >>> admm.penalty().item() > 0
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn as nn

from ..api import plan_ranks
from ..errors import CstarTypeError, CstarValueError
from ..plan import RankPlan
from ..schemes import get
from .config import AdmmConfig, TrainConfig
from .finetune import TrainHook

__all__ = ["Admm", "AdmmRecord", "TrainHook", "auto_rho"]


def auto_rho(cfg: TrainConfig, steps_per_refresh: int) -> float:
    """The "auto" ADMM weight: SGD with momentum closes the W-Z gap about once per refresh.

    Each step closes about ``lr * rho / (1 - momentum)`` of the gap, so
    ``rho = (1 - momentum) / (lr * steps_per_refresh)``.

    Example:
        >>> round(auto_rho(TrainConfig(lr=0.05, momentum=0.9), 20), 6)
        0.1
    """
    if isinstance(steps_per_refresh, bool) or not isinstance(steps_per_refresh, int) or steps_per_refresh < 1:
        raise CstarValueError(f"steps_per_refresh must be an int >= 1, got {steps_per_refresh!r}")
    return max(1.0 - cfg.momentum, 1e-3) / (cfg.lr * steps_per_refresh)


@dataclass(frozen=True)
class AdmmRecord:
    """One refresh: optimiser step, ``||W - Z||`` (absolute and relative to ``||W||``), the distance of W
    itself to its projection at the plan's ranks (relative), rho after the refresh, the planned ratio,
    the largest per-layer relative residual with its layer (the global number can hide one layer
    that has not converged), and how far this refresh's re-plan moved the ranks: the sum over layers of
    ``|new rank - old rank|``, a layer kept dense counting as rank 0 (0 without re-planning).

    Example:
        >>> AdmmRecord(0, 1.0, 0.5, 0.4, 0.01, 8.0, 0.9, "conv1").worst_layer
        'conv1'
    """

    step: int
    residual: float
    relative: float
    gap: float
    rho: float
    ratio: float
    worst: float = 0.0
    worst_layer: str = ""
    rank_moves: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dict(step=self.step, residual=self.residual, relative=self.relative, gap=self.gap,
                    rho=self.rho, ratio=self.ratio, worst=self.worst, worst_layer=self.worst_layer,
                    rank_moves=self.rank_moves)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdmmRecord":
        """The inverse of :meth:`to_dict`, each value cast back to its field's type (a checkpoint or a
        broadcast may hand back tensors or other numbers); a record without ``rank_moves`` gets 0.

        Example:
            >>> AdmmRecord.from_dict(AdmmRecord(3, 1.0, 0.5, 0.4, 0.01, 8.0, rank_moves=2).to_dict()).rank_moves
            2
        """
        casts = {f.name: {"int": int, "str": str}.get(f.type, float) for f in fields(cls)}
        return cls(**{k: casts[k](v) for k, v in data.items()})


def _default_replan(plan: RankPlan, projection: str) -> Callable[[nn.Module], RankPlan]:
    if plan.target_ratio is None or plan.budget != "params":
        raise CstarValueError("replan=True needs replan_fn=... for a plan made with a FLOP or custom budget "
                              "(e.g. replan_fn=lambda m: cstar_fx.plan_ranks(m, 8, budget='flops', example_inputs=x, "
                              "objective='discarded')); or set AdmmConfig(replan=False)")
    options = {k: (tuple(v) if isinstance(v, list) else v) for k, v in plan.options.items()}
    if projection == "euclidean":
        options["objective"] = "discarded"
    return lambda m: plan_ranks(m, plan.target_ratio, budget="params", **options)


class Admm(TrainHook):
    """The ADMM proximity term over the factorized layers of ``plan``, as a :class:`TrainHook`.

    ``replan_fn(model) -> RankPlan`` re-runs the allocator (used when ``cfg.replan``); by default it
    repeats ``plan_ranks`` with the plan's own ratio and options (parameter budgets only), with
    ``objective="discarded"`` under ``cfg.projection="euclidean"``; a ``replan_fn`` of one's own should plan with
    that objective too for a Euclidean Z-step.
    ``history`` holds one :class:`AdmmRecord` per refresh; ``plan`` is the latest plan.

    Example:
        >>> import torch.nn as nn, cstar_fx
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
        >>> admm = Admm(model, cstar_fx.plan_ranks(model, ratio=2), AdmmConfig(rho=1.0, replan=False))
        >>> admm.refresh(); len(admm.history)
        2
    """

    def __init__(self, model: nn.Module, plan: RankPlan, cfg: AdmmConfig, *,
                 replan_fn: Callable[[nn.Module], RankPlan] | None = None) -> None:
        if not isinstance(cfg, AdmmConfig):
            raise CstarTypeError(f"cfg must be an AdmmConfig, got {type(cfg).__name__}")
        if not isinstance(plan, RankPlan):
            raise CstarTypeError(f"plan must be a cstar_fx.RankPlan (from plan_ranks), got {type(plan).__name__}")
        if cfg.rho is None:
            raise CstarValueError("AdmmConfig(rho=None) means 'auto', which cstar() resolves "
                                  "from the joint phase's learning rate; to use Admm directly "
                                  "pass a number, e.g. AdmmConfig(rho=auto_rho(train_cfg, steps))")
        self.model, self.cfg, self.plan = model, cfg, plan
        self.replan_fn = (replan_fn or _default_replan(plan, cfg.projection)) if cfg.replan else None
        self.params = dict(model.named_parameters())
        self._check_plan(plan)
        self.rho = cfg.rho
        self.steps = 0
        self.history: list[AdmmRecord] = []
        self.Z: dict[str, torch.Tensor] = {}
        self.U: dict[str, torch.Tensor] = {}
        self._z_ranks: dict[str, tuple[int, ...]] = {}
        self._moves = 0  # rank moves of the latest Z-step
        self._synced_at: int | None = None  # len(history) at the last sync
        self._update_z()
        self._record()

    def _check_plan(self, plan: RankPlan) -> None:
        missing = [lp.param for lp in plan.factorized.values() if lp.param not in self.params]
        if missing:
            raise CstarValueError(f"plan parameters {missing[:3]} are not parameters of this model; "
                                  "make the plan from this model with plan_ranks(model, ...)")
        if not plan.factorized:
            raise CstarValueError("the plan factorizes no layer, so there is nothing for ADMM to constrain; "
                                  "use a higher ratio or fewer skip= entries")

    @property
    def ranks(self) -> dict[str, tuple[int, ...]]:
        """Parameter name -> ranks of every constrained weight under the current plan."""
        return {lp.param: lp.ranks for lp in self.plan.factorized.values()}

    def _project(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` projected by the scheme of the layer whose parameter is ``name``, at its planned ranks."""
        lp = next(lp for lp in self.plan.factorized.values() if lp.param == name)
        return get(lp.scheme).project(weight, lp.ranks).to(weight.dtype)

    def penalty(self) -> torch.Tensor:
        """``rho/2 * sum ||W - Z + U||^2`` over the constrained weights (differentiable in W)."""
        total = None
        for name in self.Z:
            w = self.params[name]
            term = (w - self.Z[name] + self.U[name]).pow(2).sum()
            total = term if total is None else total + term
        return 0.5 * self.rho * total  # type: ignore[operator]

    @torch.no_grad()
    def _replan(self) -> None:
        saved = {n: self.params[n].detach().clone() for n in self.Z}
        try:
            for n in self.Z:
                self.params[n].add_(self.U[n])
            plan = self.replan_fn(self.model)  # type: ignore[misc]
        finally:
            for n, w in saved.items():
                self.params[n].copy_(w)
        self._check_plan(plan)
        self.plan = plan

    @torch.no_grad()
    def _update_z(self) -> None:
        ranks = self.ranks
        for name in list(self.Z):
            if name not in ranks:  # the allocator left this layer dense now: no constraint
                del self.Z[name], self.U[name]
        for name, r in ranks.items():
            w = self.params[name].detach()
            # a Euclidean re-plan projects onto the same budget whatever ranks it picks, so the dual stays; a
            # re-plan by another objective sets this layer another constraint, whose dual starts afresh
            if self.cfg.projection == "plan" and self._z_ranks.get(name, r) != r:
                self.U[name] = torch.zeros_like(w)
            u = self.U.setdefault(name, torch.zeros_like(w))
            self.Z[name] = self._project(name, w + u)
        if self._z_ranks:
            self._moves = sum(abs(a - b) for name in ranks.keys() | self._z_ranks.keys()
                              for a, b in zip(ranks.get(name, (0, 0)), self._z_ranks.get(name, (0, 0))))
        self._z_ranks = dict(ranks)

    @torch.no_grad()
    def residual(self) -> tuple[float, float]:
        """``(||W - Z||, ||W - Z|| / ||W||)`` over all constrained weights, now.

        Example:
            >>> import torch.nn as nn, cstar_fx
            >>> m = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
            >>> r, rel = Admm(m, cstar_fx.plan_ranks(m, ratio=2), AdmmConfig(rho=1.0, replan=False)).residual()
            >>> 0 < rel < 1
            True
        """
        diff = sum(float((self.params[n] - self.Z[n]).double().pow(2).sum()) for n in self.Z)
        norm = sum(float(self.params[n].double().pow(2).sum()) for n in self.Z)
        return math.sqrt(diff), (math.sqrt(diff / norm) if norm > 0 else 0.0)

    @torch.no_grad()
    def _gap(self) -> float:
        diff = norm = 0.0
        for name in self.ranks:
            w = self.params[name].detach()
            diff += float((self._project(name, w) - w).double().pow(2).sum())
            norm += float(w.double().pow(2).sum())
        return math.sqrt(diff / norm) if norm > 0 else 0.0

    @torch.no_grad()
    def layer_residuals(self) -> dict[str, float]:
        """``||W - Z|| / ||W||`` per constrained weight, now.

        Example:
            >>> import torch.nn as nn, cstar_fx
            >>> m = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
            >>> sorted(Admm(m, cstar_fx.plan_ranks(m, ratio=2), AdmmConfig(rho=1.0, replan=False)).layer_residuals())
            ['0.weight', '1.weight']
        """
        out = {}
        for n in self.Z:
            norm = float(self.params[n].double().norm())
            out[n] = float((self.params[n] - self.Z[n]).double().norm()) / norm if norm > 0 else 0.0
        return out

    def _record(self) -> None:
        res, rel = self.residual()
        per_layer = self.layer_residuals()
        worst = max(per_layer, key=per_layer.__getitem__) if per_layer else ""
        self.history.append(AdmmRecord(self.steps, res, rel, self._gap(), self.rho, self.plan.ratio_params,
                                       per_layer.get(worst, 0.0), worst, self._moves))

    @torch.no_grad()
    def refresh(self) -> None:
        """One ADMM outer step: (re-plan on W + U,) ``Z = project(W + U)``, ``U += W - Z``, grow rho."""
        if self.replan_fn is not None:
            self._replan()
        self._update_z()
        for name in self.Z:
            self.U[name].add_(self.params[name].detach() - self.Z[name])
        new_rho = min(self.rho * self.cfg.rho_growth, self.cfg.rho_max)
        for u in self.U.values():  # U is scaled by 1/rho: keep rho * U fixed when rho changes
            u.mul_(self.rho / new_rho)
        self.rho = new_rho
        self._record()

    def after_step(self) -> None:
        """Count the step; refresh every ``cfg.refresh_every`` steps when set."""
        self.steps += 1
        if self.cfg.refresh_every is not None and self.steps % self.cfg.refresh_every == 0:
            self.refresh()

    def end_epoch(self, epoch: int) -> dict[str, float]:
        """Refresh once per epoch (the default schedule) and report the residuals."""
        if self.cfg.refresh_every is None:
            self.refresh()
        last = self.history[-1]
        return {"admm_residual": last.relative, "admm_worst_layer_residual": last.worst, "admm_gap": last.gap,
                "rho": self.rho}

    def sync(self) -> None:
        """Under ``torch.distributed``: copy rank 0's Z, U, rho, plan and history to every rank.

        Every rank computes each refresh itself (same weights, same arithmetic); broadcasting rank 0's
        result after it guarantees bit-identical state even where a GPU's SVD is not deterministic,
        so the replanned ranks, and the factorized networks built from them, agree on every rank.
        It communicates only when a refresh happened since the last call.
        """
        from . import distributed as D

        w = D.world()
        if not w.active or self._synced_at == len(self.history):
            return
        meta = D.broadcast_object({"rho": self.rho, "steps": self.steps, "plan": self.plan.to_json(indent=None),
                                   "history": [r.to_dict() for r in self.history], "names": sorted(self.Z)})
        names = meta["names"]
        if not w.is_main:
            self._restore_meta(meta)
        zs = [self.Z[n] if w.is_main else torch.empty_like(self.params[n], memory_format=torch.contiguous_format)
              for n in names]
        us = [self.U[n] if w.is_main else torch.empty_like(self.params[n], memory_format=torch.contiguous_format)
              for n in names]
        tensors = D.broadcast_tensors(zs + us)
        self.Z = dict(zip(names, tensors[:len(names)]))
        self.U = dict(zip(names, tensors[len(names):]))
        self._synced_at = len(self.history)

    def _restore_meta(self, state: dict[str, Any]) -> None:
        self.rho, self.steps = float(state["rho"]), int(state["steps"])
        self.plan = RankPlan.from_json(state["plan"])
        self.history = [AdmmRecord.from_dict(r) for r in state["history"]]

    def state_dict(self) -> dict[str, Any]:
        """Z, U, rho, the step count, the plan (JSON), the ranks Z was projected at and the history."""
        return {"rho": self.rho, "steps": self.steps, "plan": self.plan.to_json(indent=None),
                "z_ranks": {k: list(v) for k, v in self._z_ranks.items()},
                "Z": {k: v.clone() for k, v in self.Z.items()}, "U": {k: v.clone() for k, v in self.U.items()},
                "history": [r.to_dict() for r in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (on resume)."""
        self._restore_meta(state)
        self._z_ranks = {k: tuple(int(r) for r in v) for k, v in state.get("z_ranks", {}).items()} or self.ranks
        dev = {n: self.params[n].device for n in state["Z"]}
        self.Z = {k: v.to(dev[k]) for k, v in state["Z"].items()}
        self.U = {k: v.to(dev[k]) for k, v in state["U"].items()}
        self._synced_at = None
