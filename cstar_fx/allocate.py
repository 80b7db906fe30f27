"""The global rank allocator: one budget for the whole network, ranks chosen greedily across layers.

Criterion (documented in docs/concepts.md): every layer ``l`` keeps a fraction ``k_l`` of its
spectral energy, as its scheme computes it (:meth:`cstar_fx.schemes.Scheme.energy`): ``sum_{i<=r} s_i^2 /
||W_l||_F^2`` for SVD and spatial SVD and, for Tucker-2, the product of the two channel modes' kept fractions
``k_0(r_out) * k_1(r_in)``. The allocator maximises
``sum_l log k_l`` -- the product of the kept energies, a proxy for how per-layer errors compound
through depth (each term weighted by the layer's ``importance``, 1 unless a measured sensitivity
is given). Relative energies put layers of every size on the same scale, and the logarithm
makes starving any one layer expensive, so no layer is cut to nothing to pay for another.
``objective="discarded"`` minimises instead the discarded energy in absolute terms, ``sum_l ||W_l||_F^2 (1 - k_l)``
(weighted the same way): for SVD layers that is exactly ``sum_l ||W_l - Z_l||_F^2``, so the allocation is the
Euclidean projection of the weights onto the set of networks within the budget (the Z-step of CSTAR's ADMM
in its textbook form); it spends rank where the weights are large, so where batch norm makes each layer's
weight scale arbitrary it starves whole layers (measured worse, docs/robustness.md). Either
objective is separable over modes and concave in each rank (spectra are sorted), which is what
makes the greedy below sound. Starting
from the smallest ranks on the ``round_to`` grid, it repeatedly buys the rank step with the largest
error reduction per unit of cost until the budget is spent, which is the greedy solution of this
knapsack (exact when steps are small and spectra decay). A layer whose factorized form would cost at
least as much as its dense form is kept dense, and the step that reaches that point becomes "go
dense". The allocator is pure: it reads :class:`LayerSpec` objects, a cost model and the scheme registry.
"""

from __future__ import annotations

import heapq
import itertools
import math
import numbers
from dataclasses import dataclass

from .costs import CostModel, LayerSpec
from .errors import CstarError, CstarValueError
from .schemes import AUTO, DEFAULT_CONV, DENSE, Scheme, candidates, get

__all__ = ["Allocation", "Cap", "OBJECTIVES", "UnreachableBudgetError", "rank_grid", "max_ranks", "allocate",
           "min_cost"]

# what the allocator maximises per layer, by name (see the module docstring)
OBJECTIVES = ("log_energy", "discarded")


class UnreachableBudgetError(CstarError, ValueError):
    """The requested ratio cannot be met; ``max_ratio`` is the most the allocator can reach.

    Example:
        >>> err = UnreachableBudgetError("too much", max_ratio=3.5)
        >>> err.max_ratio
        3.5
    """

    def __init__(self, message: str, max_ratio: float) -> None:
        super().__init__(message)
        self.max_ratio = max_ratio


@dataclass(frozen=True)
class Allocation:
    """The allocator's answer: per layer a scheme and ranks, and the cost they add up to.

    Example:
        >>> a = Allocation({"fc": ("svd", (8,))}, total_cost=100.0, budget=120.0, dense_cost=800.0)
        >>> a.ratio
        8.0
    """

    choices: dict[str, tuple[str, tuple[int, ...]]]
    total_cost: float
    budget: float
    dense_cost: float

    @property
    def ratio(self) -> float:
        """Dense cost over allocated cost, for the whole network."""
        return self.dense_cost / self.total_cost if self.total_cost > 0 else math.inf


def scheme_for(layer: LayerSpec, conv_scheme: str = DEFAULT_CONV) -> str:
    """The scheme the allocator starts ``layer`` in (:func:`cstar_fx.schemes.candidates`): SVD for linear
    layers and 1x1 convs, ``conv_scheme`` for kxk convs; ``"auto"`` starts them as Tucker-2 (the allocator may
    then switch them to another kxk scheme).

    Example:
        >>> scheme_for(LayerSpec("c", "conv", (8, 4, 3, 3), False, ()))
        'tucker2'
    """
    return candidates(layer, conv_scheme)[0].name


def max_ranks(layer: LayerSpec, scheme: str) -> tuple[int, ...]:
    """The full ranks of a layer under a scheme (the length of each mode's spectrum).

    Example:
        >>> max_ranks(LayerSpec("c", "conv", (8, 4, 3, 3), False, ()), "tucker2")
        (8, 4)
    """
    return get(scheme).max_ranks(layer)


def rank_grid(full: int, round_to: int, min_rank: int) -> list[int]:
    """Allowed ranks for a mode: multiples of ``round_to`` from ``min_rank`` up, plus the full rank
    (a mode narrower than ``round_to`` or ``min_rank`` only has its full rank).

    Example:
        >>> rank_grid(20, 8, 1)
        [8, 16, 20]
    """
    return [r for r in range(round_to, full, round_to) if r >= min_rank] + [full]


def _score(layer: LayerSpec, scheme: str, ranks: tuple[int, ...], objective: str) -> float:
    """The allocator's objective for one layer, times its importance: the log of the kept energy, or minus the
    discarded energy (both 0 when dense)."""
    kept = get(scheme).energy(layer, ranks)
    if objective == "discarded":
        return -layer.importance * layer.spectra[0].total * (1.0 - kept)
    return layer.importance * math.log(max(kept, 1e-300))


@dataclass
class _State:
    layer: LayerSpec
    scheme: str
    grids: list[list[int]]
    idx: list[int]
    dense_cost: float
    dense: bool = False
    version: int = 0

    def ranks(self) -> tuple[int, ...]:
        return tuple(g[i] for g, i in zip(self.grids, self.idx))


def min_cost(layers: list[LayerSpec], cost: CostModel, *, round_to: int, min_rank: int,
             conv_scheme: str = DEFAULT_CONV) -> float:
    """The smallest total cost the allocator can reach for these layers (each at its cheapest form).

    Example:
        >>> from cstar_fx.costs import ParamCost
        >>> min_cost([LayerSpec("fc", "linear", (64, 64), False, ())], ParamCost(), round_to=8, min_rank=1)
        1024.0
    """
    total = 0.0
    for layer in layers:
        lowest = [(s.name, tuple(rank_grid(f, round_to, min_rank)[0] for f in s.max_ranks(layer)))
                  for s in candidates(layer, conv_scheme)]
        total += min(cost(layer, DENSE, ()), *(cost(layer, name, ranks) for name, ranks in lowest))
    return total


@dataclass(frozen=True)
class Cap:
    """A second budget the allocation must also respect: ``fixed + sum(cost) <= limit``.

    Example:
        >>> from cstar_fx.costs import ParamCost
        >>> Cap(ParamCost(), fixed=0.0, limit=1e6).limit
        1000000.0
    """

    cost: CostModel
    fixed: float
    limit: float


def _checked(cost: CostModel) -> CostModel:
    """The cost model, with every answer checked: the greedy is only sound for finite costs >= 0."""

    def checked(layer: LayerSpec, scheme: str, ranks: tuple[int, ...]) -> float:
        value = cost(layer, scheme, ranks)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise CstarValueError(f"cost model {getattr(cost, 'name', type(cost).__name__)!r} "
                                  f"returned {value!r} for layer {layer.name!r} ({scheme}, "
                                  f"ranks {ranks}); a cost must be a finite number >= 0")
        return float(value)

    return checked


def allocate(layers: list[LayerSpec], cost: CostModel, *, ratio: float, fixed_cost: float = 0.0,
             round_to: int = 8, min_rank: int = 1, conv_scheme: str = DEFAULT_CONV,
             caps: tuple[Cap, ...] = (), objective: str = "log_energy") -> Allocation:
    """Choose a scheme and ranks per layer so that the whole network's cost is ``dense / ratio``.

    ``fixed_cost`` is what the rest of the network costs (layers kept dense by rule, norms, ...).
    ``caps`` are further budgets (e.g. a parameter cap under a latency budget) no step may break.
    ``conv_scheme="auto"`` runs the greedy once from each kxk scheme (every kxk conv in that form), refines each
    run by moving single layers to another kxk scheme where that keeps more energy within the budget, and keeps
    the run with the highest objective. ``objective`` is one of :data:`OBJECTIVES`. Raises
    :class:`UnreachableBudgetError` with the reachable maximum when even the smallest ranks exceed the budget.

    Example:
        >>> import torch
        >>> from cstar_fx.costs import ParamCost
        >>> from cstar_fx.decompose import mode_spectra
        >>> w = torch.randn(64, 64)
        >>> layer = LayerSpec("fc", "linear", (64, 64), False, mode_spectra(w))
        >>> allocate([layer], ParamCost(), ratio=4).choices["fc"]
        ('svd', (8,))
    """
    if not math.isfinite(ratio) or ratio <= 1:
        raise CstarValueError(f"ratio must be a finite number > 1, got {ratio!r}")
    if objective not in OBJECTIVES:
        raise CstarValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    cost = _checked(cost)
    # "auto": the greedy from each kxk scheme in turn, each refined by the one-swap search. With caps, each start
    # also runs at several prices of the caps (0: a cap only stops steps that would break it; 1: every budget
    # counts as the share of it a step uses): which price keeps the most energy depends on how tight the cap is.
    starts = _auto_starts(layers) if conv_scheme == AUTO else [conv_scheme]
    best: tuple[float, Allocation] | None = None
    unreachable: UnreachableBudgetError | None = None
    for start in starts:
        for price in _CAP_PRICES if caps else (0.0,):
            try:
                alloc = _greedy(layers, cost, ratio, fixed_cost, round_to, min_rank, start, caps, price,
                                swap=conv_scheme == AUTO, objective=objective)
            except UnreachableBudgetError as exc:
                unreachable = exc if unreachable is None or exc.max_ratio > unreachable.max_ratio else unreachable
                continue
            total = sum(_score(layer, *alloc.choices[layer.name], objective) for layer in layers)
            if best is None or total > best[0]:
                best = (total, alloc)
    if best is None:
        raise unreachable  # type: ignore[misc]
    return best[1]


def _auto_starts(layers: list[LayerSpec]) -> list[str]:
    """The kxk schemes ``"auto"`` starts the greedy from (Tucker-2 first): those every layer has the spectra for."""
    order: dict[str, Scheme] = {}
    for layer in layers:
        order.update((s.name, s) for s in candidates(layer, AUTO) if s.name not in order)
    return [n for n, s in order.items() if all(s.has_spectra(layer) for layer in layers if s.applies(layer))]


_CAP_PRICES = (0.0, 0.25, 1.0, 4.0)


def _greedy(layers: list[LayerSpec], cost: CostModel, ratio: float, fixed_cost: float, round_to: int, min_rank: int,
            conv_scheme: str, caps: tuple[Cap, ...], cap_price: float, swap: bool, objective: str) -> Allocation:
    """The greedy with kxk convs in ``conv_scheme``, each cap's share weighted by ``cap_price`` in a step's price;
    ``swap``: then the one-swap search over the other kxk schemes."""
    states: dict[str, _State] = {}
    dense_total = fixed_cost
    spent = fixed_cost
    for layer in layers:
        scheme = scheme_for(layer, conv_scheme)
        grids = [rank_grid(f, round_to, min_rank) for f in max_ranks(layer, scheme)]
        st = _State(layer, scheme, grids, [0] * len(grids), cost(layer, DENSE, ()))
        dense_total += st.dense_cost
        if cost(layer, scheme, st.ranks()) >= st.dense_cost:
            st.dense = True
        spent += st.dense_cost if st.dense else cost(layer, scheme, st.ranks())
        states[layer.name] = st
    budget = dense_total / ratio

    def form(st: _State) -> tuple[str, tuple[int, ...]]:
        return (DENSE, ()) if st.dense else (st.scheme, st.ranks())

    if spent > budget * (1 + 1e-12):
        best = dense_total / spent
        # Rounded down, so the ratio suggested is itself reachable (2.846 -> 2.84, never 2.85).
        digits = 2
        while math.floor(best * 10 ** digits) / 10 ** digits <= 1 and digits < 6:
            digits += 1
        safe = math.floor(best * 10 ** digits) / 10 ** digits
        ask = (f"Ask for ratio <= {safe:.{digits}f}, or lower round_to/min_rank." if safe > 1 else
               "No ratio above 1 is reachable: lower round_to/min_rank.")
        raise UnreachableBudgetError(
            f"ratio {ratio:g} is unreachable: the smallest ranks allowed (round_to={round_to}, min_rank={min_rank}) "
            f"and the layers that stay dense already cost {spent:.4g} of a {budget:.4g} budget; the reachable "
            f"maximum is {best:.4f}x. " + ask, max_ratio=best)

    cap_spent = [cap.fixed + sum(cap.cost(st.layer, *form(st)) for st in states.values()) for cap in caps]
    for cap, used in zip(caps, cap_spent):
        if used > cap.limit * (1 + 1e-12):
            raise UnreachableBudgetError(
                f"the {getattr(cap.cost, 'name', 'secondary')} cap is unreachable: the smallest ranks already cost "
                f"{used:.4g} > {cap.limit:.4g}; ask for a lower ratio (or param_ratio), or lower round_to/min_rank.",
                max_ratio=dense_total / spent)

    heap: list[tuple[float, int, str, int, int]] = []
    counter = 0

    def push(st: _State) -> None:
        nonlocal counter
        if st.dense:
            return
        now_cost = cost(st.layer, st.scheme, st.ranks())
        now_score = _score(st.layer, st.scheme, st.ranks(), objective)
        for mode, grid in enumerate(st.grids):
            if st.idx[mode] + 1 >= len(grid):
                continue
            idx = list(st.idx)
            idx[mode] += 1
            ranks = tuple(g[i] for g, i in zip(st.grids, idx))
            new_cost = cost(st.layer, st.scheme, ranks)
            if new_cost >= st.dense_cost:
                gain, delta, after = -now_score, st.dense_cost - now_cost, (DENSE, ())
            else:
                gain = _score(st.layer, st.scheme, ranks, objective) - now_score
                delta, after = new_cost - now_cost, (st.scheme, ranks)
            # The step that buys the most energy per share of the budget (and of the caps, at their price) wins:
            # the usual greedy for several knapsack constraints.
            weighted = delta / budget + cap_price * sum(
                (cap.cost(st.layer, *after) - cap.cost(st.layer, st.scheme, st.ranks())) / cap.limit for cap in caps)
            priority = math.inf if weighted <= 0 else gain / weighted
            counter += 1
            heapq.heappush(heap, (-priority, counter, st.layer.name, mode, st.version))

    for st in states.values():
        push(st)
    while heap:
        _, _, name, mode, version = heapq.heappop(heap)
        st = states[name]
        if version != st.version or st.dense:
            continue
        now_cost = cost(st.layer, st.scheme, st.ranks())
        idx = list(st.idx)
        idx[mode] += 1
        ranks = tuple(g[i] for g, i in zip(st.grids, idx))
        new_cost = cost(st.layer, st.scheme, ranks)
        go_dense = new_cost >= st.dense_cost
        delta = (st.dense_cost if go_dense else new_cost) - now_cost
        if spent + delta > budget:
            continue  # this mode cannot grow any more within the budget; other layers still may
        after = (DENSE, ()) if go_dense else (st.scheme, ranks)
        cap_delta = [cap.cost(st.layer, *after) - cap.cost(st.layer, *form(st)) for cap in caps]
        if any(used + d > cap.limit for cap, used, d in zip(caps, cap_spent, cap_delta)):
            continue
        cap_spent = [used + d for used, d in zip(cap_spent, cap_delta)]
        spent += delta
        st.version += 1
        if go_dense:
            st.dense = True
        else:
            st.idx = idx
            push(st)
    choices = {name: form(st) for name, st in states.items()}
    if swap:
        spent += _prefer_better_scheme(choices, states, cost, budget - spent, caps, cap_spent, round_to, min_rank,
                                       objective)
    return Allocation(choices, total_cost=spent, budget=budget, dense_cost=dense_total)


def _prefer_better_scheme(choices: dict[str, tuple[str, tuple[int, ...]]], states: dict[str, "_State"],
                          cost: CostModel, slack: float, caps: tuple[Cap, ...], cap_spent: list[float],
                          round_to: int, min_rank: int, objective: str) -> float:
    """``conv_scheme="auto"``: after a greedy, move each factorized kxk conv to the other kxk scheme and ranks that
    keep the most energy, when that is more than it keeps now, for no more than its cost plus the unspent budget
    and within the caps (a one-swap local search: the budget stays met). Returns the change in total cost; edits
    ``choices`` in place."""
    change = 0.0
    for name, (scheme, ranks) in list(choices.items()):
        layer = states[name].layer
        if scheme == DENSE:
            continue
        now_cost, now_score = cost(layer, scheme, ranks), _score(layer, scheme, ranks, objective)
        now_caps = [cap.cost(layer, scheme, ranks) for cap in caps]
        best = None
        for other in candidates(layer, AUTO):
            if other.name == scheme or not other.has_spectra(layer):
                continue
            for option in _rank_options(other, layer, round_to, min_rank):
                c = cost(layer, other.name, option)
                if c - now_cost > slack - change:
                    continue
                deltas = [cap.cost(layer, other.name, option) - old for cap, old in zip(caps, now_caps)]
                if any(used + d > cap.limit for cap, used, d in zip(caps, cap_spent, deltas)):
                    continue
                score = _score(layer, other.name, option, objective)
                if score > now_score and (best is None or score > best[0]):
                    best = (score, (other.name, option), c, deltas)
        if best is not None:
            _, choice, c, deltas = best
            choices[name] = choice
            change += c - now_cost
            cap_spent[:] = [used + d for used, d in zip(cap_spent, deltas)]
    return change


def _rank_options(scheme: Scheme, layer: LayerSpec, round_to: int, min_rank: int) -> list[tuple[int, ...]]:
    """Every rank combination on the grid of each of the scheme's modes."""
    return list(itertools.product(*(rank_grid(f, round_to, min_rank) for f in scheme.max_ranks(layer))))
