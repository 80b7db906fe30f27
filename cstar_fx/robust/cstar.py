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
import os
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..api import plan_ranks, transform
from ..config import CstarConfig
from ..passes.shapes import as_tuple
from ..plan import RankPlan
from .admm import Admm
from .config import JointConfig, TrainConfig
from .finetune import _model_device, finetune

__all__ = ["cstar", "decompose_finetune"]

_TRACE_OPTIONS = ("leaf_modules", "concrete_args")


def _sub(run_dir: str | os.PathLike[str] | None, name: str) -> Path | None:
    return None if run_dir is None else Path(run_dir) / name


def _on(example_inputs: Any, device: torch.device) -> Any:
    if example_inputs is None:
        return None
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in as_tuple(example_inputs))


def cstar(model: nn.Module, train_data: Any, ratio: float | CstarConfig = 8, cfg: JointConfig | None = None, *,
          example_inputs: Any = None, run_dir: str | os.PathLike[str] | None = None, resume: bool = False,
          device: str | torch.device | None = None, **plan_options: Any) -> fx.GraphModule:
    """CSTAR: ADMM adversarial training towards the planned ranks, ``transform``, adversarial fine-tune.

    ``ratio`` and ``plan_options`` (``budget``, ``round_to``, ``skip``, ...) are those of
    :func:`cstar_fx.plan_ranks`; ``example_inputs`` (on the training device) is needed for
    ``budget="flops"``. ``cfg`` holds the joint-phase and fine-tune :class:`TrainConfig` and the
    :class:`AdmmConfig`. With ``run_dir`` each phase checkpoints under ``run_dir/joint`` and
    ``run_dir/finetune``; ``resume=True`` continues a killed run. The input model is not modified.

    Example:
        >>> gm = cstar(teacher, train, ratio=16, cfg=JointConfig(), run_dir="runs/cstar16")  # doctest: +SKIP
        >>> cstar_fx.get_plan(gm).ratio_params  # doctest: +SKIP
        16.0...
    """
    cfg = JointConfig() if cfg is None else cfg
    if not isinstance(cfg, JointConfig):
        raise TypeError(f"cfg must be a JointConfig (joint=TrainConfig, finetune=TrainConfig, admm=AdmmConfig), "
                        f"got {type(cfg).__name__}")
    dense = copy.deepcopy(model)
    dev = torch.device(device) if device is not None else _model_device(model)
    dense.to(dev)
    example_inputs = _on(example_inputs, dev)

    def replan(m: nn.Module) -> RankPlan:
        return plan_ranks(m, ratio, example_inputs=example_inputs, **plan_options)

    admm = Admm(dense, replan(dense), cfg.admm, replan_fn=replan)
    joint = finetune(dense, train_data, cfg.joint, run_dir=_sub(run_dir, "joint"), resume=resume, device=dev, hook=admm)
    gm = transform(dense, plan=admm.plan, example_inputs=example_inputs,
                   **{k: v for k, v in plan_options.items() if k in _TRACE_OPTIONS})
    tuned = finetune(gm, train_data, cfg.finetune, run_dir=_sub(run_dir, "finetune"), resume=resume, device=dev)
    gm.meta["cstar_training"] = {"method": "cstar", "joint": joint.to_dict(), "finetune": tuned.to_dict(),
                                 "admm": [r.to_dict() for r in admm.history], "config": cfg.to_dict()}
    return gm


def decompose_finetune(model: nn.Module, train_data: Any, ratio: float | CstarConfig = 8, cfg: TrainConfig | None = None,
                       *, example_inputs: Any = None, run_dir: str | os.PathLike[str] | None = None,
                       resume: bool = False, device: str | torch.device | None = None,
                       **plan_options: Any) -> fx.GraphModule:
    """The plain variant: ``transform`` at ``ratio`` (no ADMM), then adversarial fine-tuning with ``cfg``.

    Arguments as in :func:`cstar`; ``cfg`` is the fine-tune :class:`TrainConfig`, checkpointed under
    ``run_dir/finetune``.

    Example:
        >>> from cstar_fx.data import digits
        >>> from cstar_fx.models import small_cnn
        >>> gm = decompose_finetune(small_cnn(width=16), digits()[0].subset(128), 4, TrainConfig(epochs=1, lr=0.01))
        >>> gm.meta["cstar_training"]["method"]
        'decompose_finetune'
    """
    cfg = TrainConfig() if cfg is None else cfg
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    dev = torch.device(device) if device is not None else _model_device(model)
    example_inputs = _on(example_inputs, dev)
    gm = transform(model, ratio, example_inputs=example_inputs, **plan_options)
    tuned = finetune(gm, train_data, cfg, run_dir=_sub(run_dir, "finetune"), resume=resume, device=dev)
    gm.meta["cstar_training"] = {"method": "decompose_finetune", "finetune": tuned.to_dict(), "config": cfg.to_dict()}
    return gm
