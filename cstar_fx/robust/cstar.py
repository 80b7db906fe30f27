"""The whole CSTAR method in one call, and the plain decompose-then-fine-tune variant for comparison.

``cstar``: adversarial training of a copy of the dense model with the ADMM proximity term (weights
pulled towards their low-rank projection at the global allocator's ranks), then ``transform`` at
those ranks, then adversarial fine-tuning of the factorized network. ``decompose_finetune``: the
same without the ADMM phase. Both leave the input model untouched and return the factorized
``GraphModule``; the training histories are in ``gm.meta["cstar_training"]``.

Example:
    >>> import cstar_fx
    >>> from cstar_fx.data import digits
    >>> from cstar_fx.models import small_cnn
    >>> from cstar_fx.robust import JointConfig, TrainConfig
    >>> quick = TrainConfig(epochs=1, lr=0.01, batch_size=64)
    >>> gm = cstar(small_cnn(width=16), digits()[0].subset(128), 4, JointConfig(joint=quick, finetune=quick))
    >>> round(cstar_fx.get_report(gm).ratio_params) >= 3
    True
"""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..analysis import TRACE_OPTIONS, count_flops, count_params
from ..api import get_plan, plan_ranks, refold, transform
from ..config import CstarConfig
from ..data import as_loader
from ..errors import CstarTypeError, CstarValueError
from ..passes.prune import PRUNE_BUDGETS, budget_costs, prune_to_ratio_finer
from ..plan import RankPlan
from ..report import get_report
from ..torchutil import as_tuple, model_device, private_rng
from .admm import Admm, auto_rho
from .attacks import pgd_attack
from .config import (RECOMMENDED, JointConfig, Recipe, TrainConfig, check_gradual_epochs, check_prune_epochs,
                     check_prune_share)
from .finetune import finetune, recalibrate_bn
from .sensitivity import layer_sensitivity

__all__ = ["compress", "cstar", "decompose_finetune", "calibration_batches", "model_on"]

# what layer_sensitivity traces with (unpack_attention rewrites the model before tracing; it does not take it)
_TRACE_CALL_OPTIONS = ("leaf_modules", "concrete_args", "autowrap_functions")
_HANDOFF_RESIDUAL = 0.25  # relative ||W - Z|| of a layer above which the hand-off is a hard cut


def calibration_batches(model: nn.Module, train_data: Any, n: int, cfg: TrainConfig, *,
                        device: torch.device | None = None) -> list[torch.Tensor]:
    """The first ``n`` training inputs and their adversarial examples against ``model`` (``cfg.loss.attack``).

    These are what a data-aware :func:`~cstar_fx.transform` (``calibration=``) should preserve the
    layers' outputs on: the inputs the robust model must classify, clean and attacked. Costs one
    attack on ``n`` images (``steps + 1`` forward/backward passes each); the RNG is seeded by ``cfg.seed``.

    Example:
        >>> from cstar_fx.data import digits
        >>> from cstar_fx.models import small_cnn
        >>> xs = calibration_batches(small_cnn(width=8), digits()[0], 64, TrainConfig(batch_size=32))
        >>> [tuple(x.shape) for x in xs]
        [(32, 1, 8, 8), (32, 1, 8, 8), (32, 1, 8, 8), (32, 1, 8, 8)]
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CstarValueError(f"the number of calibration images must be an int >= 1, got {n!r}")
    dev = device if device is not None else model_device(model)
    a = cfg.loss.attack
    out: list[torch.Tensor] = []
    seen = 0
    with private_rng(dev, cfg.seed):
        for x, y in as_loader(train_data, min(cfg.batch_size, n), False, dev):
            x, y = x[: n - seen], y[: n - seen]
            adv = pgd_attack(model, x, y, a)
            out += [x, adv.detach()]
            seen += x.shape[0]
            if seen >= n:
                break
    return out


def _sub(run_dir: str | os.PathLike[str] | None, name: str) -> Path | None:
    return None if run_dir is None else Path(run_dir) / name


def _on(example_inputs: Any, device: torch.device) -> Any:
    if example_inputs is None:
        return None
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in as_tuple(example_inputs))


def cstar(model: nn.Module, train_data: Any, ratio: float | CstarConfig = 8, cfg: JointConfig | None = None, *,
          example_inputs: Any = None, run_dir: str | os.PathLike[str] | None = None, resume: bool = False,
          device: str | torch.device | None = None, calibrate: int = 0, **plan_options: Any) -> fx.GraphModule:
    """CSTAR: ADMM adversarial training towards the planned ranks, ``transform``, adversarial fine-tune.

    ``ratio`` and ``plan_options`` (``budget``, ``round_to``, ``skip``, ...) are those of
    :func:`cstar_fx.plan_ranks`; ``example_inputs`` (on the training device) is needed for
    ``budget="flops"`` and ``"both"``. ``cfg`` holds the joint-phase and fine-tune :class:`TrainConfig` and the
    :class:`AdmmConfig`. With ``run_dir`` each phase checkpoints under ``run_dir/joint`` and
    ``run_dir/finetune``; ``resume=True`` continues a killed run. The input model is not modified.
    ``calibrate=N`` makes the hand-off data-aware (as in :func:`decompose_finetune`, on the jointly
    trained weights); ``cfg.finetune.loss.distill > 0`` distils from ``model`` in the fine-tune.

    The paper's method. At equal training compute it measured no better than transform + fine-tune and
    below the recommended recipe (docs/robustness.md); for that recipe call :func:`compress`.

    Example:
        >>> gm = cstar(teacher, train, ratio=16, cfg=JointConfig(), run_dir="runs/cstar16")  # doctest: +SKIP
        >>> cstar_fx.get_plan(gm).ratio_params  # doctest: +SKIP
        16.0...
    """
    cfg = JointConfig() if cfg is None else cfg
    if not isinstance(cfg, JointConfig):
        raise CstarTypeError(f"cfg must be a JointConfig (joint=TrainConfig, finetune=TrainConfig, admm=AdmmConfig), "
                             f"got {type(cfg).__name__}")
    _check_count("calibrate", calibrate)
    dense = copy.deepcopy(model)
    dev = torch.device(device) if device is not None else model_device(model)
    dense.to(dev)
    example_inputs = _on(example_inputs, dev)

    admm_cfg = cfg.admm
    # the Z-step's plans: the plan's objective, or under projection="euclidean" the projection onto the budget
    euclidean = admm_cfg.projection == "euclidean"
    if euclidean and plan_options.get("objective", "discarded") != "discarded":
        raise CstarValueError(f"objective={plan_options['objective']!r}: the ADMM Z-step's "
                              "plans are Euclidean projections (objective='discarded'); drop "
                              "objective=, or set AdmmConfig(projection='plan') to plan with it")
    z_options = dict(plan_options, objective="discarded") if euclidean else plan_options

    def replan(m: nn.Module) -> RankPlan:
        return plan_ranks(m, ratio, example_inputs=example_inputs, **z_options)

    if admm_cfg.rho is None:
        steps = admm_cfg.refresh_every or len(as_loader(train_data, cfg.joint.batch_size, True, dev))
        rho = auto_rho(cfg.joint, max(1, steps))
        admm_cfg = admm_cfg.replace(rho=rho, rho_max=max(admm_cfg.rho_max, rho))
    admm = Admm(dense, replan(dense), admm_cfg, replan_fn=replan)
    joint = finetune(dense, train_data, cfg.joint, run_dir=_sub(run_dir, "joint"), resume=resume, device=dev, hook=admm)
    last = admm.history[-1]
    if cfg.joint.epochs and last.worst > _HANDOFF_RESIDUAL:
        warnings.warn(f"ADMM hand-off: layer {last.worst_layer!r} is still {last.worst:.0%} away from its low-rank "
                      f"projection (global {last.relative:.0%}), so transform will cut it hard; give the joint phase "
                      f"more epochs or a larger AdmmConfig(rho=...)", stacklevel=2)
    calibration = calibration_batches(dense, train_data, calibrate, cfg.finetune, device=dev) if calibrate else None
    gm = transform(dense, plan=admm.plan, example_inputs=example_inputs, calibration=calibration,
                   **_only(plan_options, TRACE_OPTIONS))
    recalibrate_bn(gm, train_data, batch_size=cfg.finetune.batch_size, seed=cfg.finetune.seed, device=dev)
    tuned = finetune(gm, train_data, cfg.finetune, run_dir=_sub(run_dir, "finetune"), resume=resume, device=dev,
                     teacher=model_on(model, dev) if cfg.finetune.loss.distill > 0 else None)
    gm.meta["cstar_training"] = {"method": "cstar", "joint": joint.to_dict(), "finetune": tuned.to_dict(),
                                 "admm": [r.to_dict() for r in admm.history],
                                 "config": cfg.replace(admm=admm_cfg).to_dict(), "calibrate": calibrate}
    return gm


def decompose_finetune(model: nn.Module, train_data: Any, ratio: float | CstarConfig = 8, cfg: TrainConfig | None = None,
                       *, example_inputs: Any = None, run_dir: str | os.PathLike[str] | None = None,
                       resume: bool = False, device: str | torch.device | None = None, calibrate: int = 0,
                       sensitivity: int = 0, prune: float = 0.0, prune_epochs: int = 0, gradual_epochs: int = 0,
                       **plan_options: Any) -> fx.GraphModule:
    """``transform`` at ``ratio`` (no ADMM), batch-norm re-estimation, then adversarial fine-tuning with ``cfg``.

    Arguments as in :func:`cstar`; ``cfg`` is the fine-tune :class:`TrainConfig`, checkpointed under
    ``run_dir/finetune``. ``calibrate=N`` makes the factorization data-aware: the layers' outputs are
    preserved on the first ``N`` training images and their adversarial examples against ``model``
    (:func:`calibration_batches`). ``sensitivity=N`` weighs the rank allocation by each layer's
    measured sensitivity of the adversarial loss on the first ``N`` training images
    (:func:`~cstar_fx.robust.layer_sensitivity`). With ``cfg.loss.distill > 0`` the fine-tune distils
    from ``model`` (used read-only, in eval mode).

    ``prune=s`` (0 <= s < 1) spends the share ``s`` of the compression (in log terms) on channel pruning
    first: Torch-Pruning (global L2, granularity ``round_to``, finer where needed) makes ``model``
    about ``ratio ** s`` times smaller (within 25%) in what ``budget`` counts, batch norm is re-estimated, and the pruned
    network is factorized for the rest, so the result is ``ratio`` times smaller in all (with
    ``budget="both"``: at least ``ratio`` times in parameters and in FLOPs). Calibration and
    sensitivity are then measured on the pruned network; distillation stays from ``model``. Needs
    a numeric ``ratio`` with budget ``"params"``, ``"flops"`` or ``"both"``. ``prune_epochs=k``
    (``0 <= k < cfg.epochs``) spends the first ``k`` of ``cfg.epochs`` on the pruned network, at
    ``cfg.lr`` held constant (checkpointed under ``run_dir/prune_finetune``), before it is factorized;
    the factorized network gets the other ``cfg.epochs - k`` with ``cfg``'s schedule: the same
    training compute, compressed in two steps.

    ``gradual_epochs=g`` reduces the ranks in two steps (gradual rank reduction): the network is first
    factorized at the square root of the ratio left to the factorization (same plan options,
    calibration and sensitivity), trained for ``g`` epochs at ``cfg.lr`` held constant (checkpointed
    under ``run_dir/gradual_finetune``), folded back into dense weights (:func:`cstar_fx.refold`) and
    factorized at the full ratio, which re-truncates what it learnt; then the rest of ``cfg.epochs``.
    ``prune_epochs + gradual_epochs < cfg.epochs``; numeric ``ratio`` only.

    Example:
        >>> from cstar_fx.data import digits
        >>> from cstar_fx.models import small_cnn
        >>> gm = decompose_finetune(small_cnn(width=16), digits()[0].subset(128), 4, TrainConfig(epochs=1, lr=0.01))
        >>> gm.meta["cstar_training"]["method"]
        'decompose_finetune'
    """
    cfg = TrainConfig() if cfg is None else cfg
    if not isinstance(cfg, TrainConfig):
        raise CstarTypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    _check_count("calibrate", calibrate)
    _check_count("sensitivity", sensitivity)
    prune = check_prune_share(prune)
    prune_epochs = check_prune_epochs(prune_epochs, prune, cfg.epochs)
    gradual_epochs = check_gradual_epochs(gradual_epochs, cfg.epochs, prune_epochs)
    if gradual_epochs:
        _check_numeric_ratio(ratio, "gradual_epochs= needs a numeric ratio (its square root is the first step)")
    dev = torch.device(device) if device is not None else model_device(model)
    example_inputs = _on(example_inputs, dev)
    teacher = model_on(model, dev)
    base = teacher
    pruned_history = None
    if prune:
        base, ratio = _prune_first(teacher, train_data, ratio, prune, cfg, example_inputs, dev, plan_options)
    distill_from = teacher if cfg.loss.distill > 0 else None
    if prune_epochs:
        pruned_history = finetune(base, train_data, _stage(cfg, prune_epochs, 0),
                                  run_dir=_sub(run_dir, "prune_finetune"), resume=resume, device=dev,
                                  teacher=distill_from).to_dict()
    gradual_history = None
    if gradual_epochs:
        # the final ranks are planned after the first stage's training; an unreachable ratio fails before it
        plan_ranks(base, ratio, example_inputs=example_inputs, **plan_options)
        mid, _ = _factorize(base, train_data, ratio ** 0.5, cfg, calibrate, sensitivity, example_inputs, dev,
                            plan_options)
        recalibrate_bn(mid, train_data, batch_size=cfg.batch_size, seed=cfg.seed, device=dev)
        gradual_history = finetune(mid, train_data, _stage(cfg, gradual_epochs, prune_epochs),
                                   run_dir=_sub(run_dir, "gradual_finetune"), resume=resume, device=dev,
                                   teacher=distill_from).to_dict()
        gradual_history["ranks"] = {name: list(lp.ranks) for name, lp in get_plan(mid).factorized.items()}
        base = refold(mid, base, **_only(plan_options, TRACE_OPTIONS))
    done = prune_epochs + gradual_epochs
    rest = cfg.replace(epochs=cfg.epochs - done, warmup_epochs=max(0.0, cfg.warmup_epochs - done))
    gm, weights = _factorize(base, train_data, ratio, cfg, calibrate, sensitivity, example_inputs, dev, plan_options)
    if prune:  # the report counts from the model given, not from its pruned copy, so its ratios are end to end
        report = get_report(gm)
        gm.meta["cstar_report"] = dataclasses.replace(report, dense_params=count_params(teacher), dense_flops=(
            None if report.dense_flops is None else count_flops(teacher, example_inputs)))
    recalibrate_bn(gm, train_data, batch_size=cfg.batch_size, seed=cfg.seed, device=dev)
    tuned = finetune(gm, train_data, rest, run_dir=_sub(run_dir, "finetune"), resume=resume, device=dev,
                     teacher=distill_from)
    gm.meta["cstar_training"] = {"method": "decompose_finetune", "finetune": tuned.to_dict(), "config": cfg.to_dict(),
                                 "calibrate": calibrate, "sensitivity": weights, "prune": prune,
                                 "prune_epochs": prune_epochs, "pruned_finetune": pruned_history,
                                 "gradual_epochs": gradual_epochs, "gradual_finetune": gradual_history}
    return gm


def compress(model: nn.Module, train_data: Any, ratio: float = 8, cfg: TrainConfig | None = None, *,
             recipe: Recipe = RECOMMENDED, example_inputs: Any = None, run_dir: str | os.PathLike[str] | None = None,
             resume: bool = False, device: str | torch.device | None = None, **plan_options: Any) -> fx.GraphModule:
    """Robust compression by a :class:`Recipe`, by default :data:`RECOMMENDED`, the one the benchmark supports.

    :func:`decompose_finetune` with the recipe's levers (calibration, sensitivity, pruning share, epochs on the
    pruned network, budget) and its distillation weight in ``cfg``'s loss; ``cfg`` is the whole adversarial
    fine-tune (the epochs on the pruned network come out of ``cfg.epochs``). ``plan_options`` are
    :func:`cstar_fx.plan_ranks`' other options (``round_to``, ``skip``, ...); the budget is the recipe's, so
    ``budget=`` is refused, as is a ``cfg.loss.distill`` the recipe would overrule. With the default recipe
    (``budget="both"``) ``example_inputs`` is required. The recipe is recorded in
    ``gm.meta["cstar_training"]["recipe"]``. The input model is not modified.

    Example:
        >>> from cstar_fx.data import digits
        >>> from cstar_fx.models import small_cnn
        >>> train = digits()[0].subset(128)
        >>> gm = compress(small_cnn(width=16), train, 4, TrainConfig(epochs=2, lr=0.01), example_inputs=train.x[:1])
        >>> gm.meta["cstar_training"]["recipe"] == RECOMMENDED.to_dict()
        True
    """
    if not isinstance(recipe, Recipe):
        raise CstarTypeError(f"recipe must be a cstar_fx.robust.Recipe (e.g. RECOMMENDED.replace(...)), "
                             f"got {type(recipe).__name__}")
    cfg = TrainConfig() if cfg is None else cfg
    if not isinstance(cfg, TrainConfig):
        raise CstarTypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    if "budget" in plan_options:
        raise CstarValueError(f"budget comes from the recipe ({recipe.budget!r}); pass "
                              f"recipe=recipe.replace(budget={plan_options['budget']!r}) instead of budget=")
    if cfg.loss.distill not in (0.0, recipe.distill):
        raise CstarValueError(f"cfg.loss.distill={cfg.loss.distill:g} but the recipe's distill is {recipe.distill:g}; "
                              f"pass recipe=recipe.replace(distill={cfg.loss.distill:g}) to distil")
    try:
        check_prune_epochs(recipe.prune_epochs, recipe.prune, cfg.epochs)
    except CstarValueError as exc:
        raise CstarValueError(f"the recipe's {exc}; raise cfg.epochs or pass "
                              "recipe=recipe.replace(prune_epochs=0)") from None
    gm = decompose_finetune(model, train_data, ratio, cfg.replace(loss=cfg.loss.replace(distill=recipe.distill)),
                            example_inputs=example_inputs, run_dir=run_dir, resume=resume, device=device,
                            calibrate=recipe.calibrate, sensitivity=recipe.sensitivity, prune=recipe.prune,
                            prune_epochs=recipe.prune_epochs, budget=recipe.budget, **plan_options)
    gm.meta["cstar_training"]["recipe"] = recipe.to_dict()
    return gm


def _stage(cfg: TrainConfig, epochs: int, after: int) -> TrainConfig:
    """An early stage of ``cfg`` (``epochs`` of them, ``after`` epochs already run): at ``cfg.lr`` held constant,
    with what is left of the warm-up."""
    return cfg.replace(epochs=epochs, schedule="constant",
                       warmup_epochs=min(max(0.0, cfg.warmup_epochs - after), epochs))


def _factorize(base: nn.Module, train_data: Any, ratio: float, cfg: TrainConfig, calibrate: int, sensitivity: int,
               example_inputs: Any, dev: torch.device, plan_options: dict[str, Any]
               ) -> tuple[fx.GraphModule, dict[str, float] | None]:
    """``transform(base, ratio)``, data-aware on ``calibrate`` images and weighted by the sensitivity measured on
    ``sensitivity`` images (both of ``base``); with the sensitivity weights it used."""
    calibration = calibration_batches(base, train_data, calibrate, cfg, device=dev) if calibrate else None
    weights = None
    if sensitivity:
        weights = layer_sensitivity(base, train_data, cfg.loss.attack, n=sensitivity, batch_size=cfg.batch_size,
                                    seed=cfg.seed, **_only(plan_options, _TRACE_CALL_OPTIONS))
    return transform(base, ratio, example_inputs=example_inputs, calibration=calibration, sensitivity=weights,
                     **plan_options), weights


def _prune_first(teacher: nn.Module, train_data: Any, ratio: Any, share: float, cfg: TrainConfig, example_inputs: Any,
                 dev: torch.device, plan_options: dict[str, Any]) -> tuple[nn.Module, float]:
    """The channel-pruned ``teacher`` (``ratio ** share`` smaller, batch norm re-estimated) and the ratio left for
    the factorization, so that both steps together reach ``ratio`` in what the budget counts."""
    _check_numeric_ratio(ratio, "prune= needs a numeric ratio (the total ratio)")
    budget = plan_options.get("budget", CstarConfig.budget)
    if budget not in PRUNE_BUDGETS:
        raise CstarValueError(f"prune= splits a parameter or FLOP ratio; it cannot go with budget={budget!r} "
                              f"(use one of {', '.join(PRUNE_BUDGETS)})")
    if example_inputs is None:
        example_inputs = (next(iter(as_loader(train_data, 1, False, dev)))[0],)
    # the factorization takes whatever the pruning leaves, so the pruning need not land within 3% of its share
    pruned, _ = prune_to_ratio_finer(teacher, ratio ** share, example_inputs, importance="l2", budget=budget,
                                     round_to=plan_options.get("round_to", CstarConfig.round_to), tolerance=0.25)
    recalibrate_bn(pruned, train_data, batch_size=cfg.batch_size, seed=cfg.seed, device=dev)
    # "both": the larger leftover, so that both steps together reach `ratio` in parameters and in FLOPs alike
    dense = budget_costs(teacher, example_inputs, budget)
    return pruned, max(ratio * cost / dense[k] for k, cost in budget_costs(pruned, example_inputs, budget).items())


def _check_numeric_ratio(ratio: Any, need: str) -> None:
    if isinstance(ratio, (CstarConfig, bool)) or not isinstance(ratio, (int, float)):
        raise CstarTypeError(f"{need}, got {type(ratio).__name__}")


def _only(options: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The ``options`` named in ``names``."""
    return {k: v for k, v in options.items() if k in names}


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CstarValueError(f"{name} must be a number of training images >= 0 (0: off), got {value!r}")


def model_on(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` itself when it is already on ``device`` (it is only read), else a copy moved there.

    Example:
        >>> m = nn.Linear(2, 2)
        >>> model_on(m, torch.device("cpu")) is m
        True
    """
    return model if model_device(model) == device else copy.deepcopy(model).to(device)
