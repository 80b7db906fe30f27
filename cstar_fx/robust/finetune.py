"""A ready adversarial training loop: SGD + schedule, bf16 on CUDA, channels_last, atomic per-epoch checkpoints, resume.

The loop has no global state: the device, the data's sampler and an optional :class:`TrainHook`
(e.g. CSTAR's ADMM term) are arguments, and random numbers come from a private generator state
seeded by ``(cfg.seed, epoch)``, so the caller's RNG is untouched and a resumed run repeats exactly
the epochs an uninterrupted one would have run.

Example:
    >>> from cstar_fx.data import digits
    >>> from cstar_fx.models import small_cnn
    >>> from cstar_fx.robust import TrainConfig, LossConfig
    >>> train, _ = digits()
    >>> hist = finetune(small_cnn(width=8), train.subset(256), TrainConfig(epochs=1, loss=LossConfig("clean")))
    >>> len(hist.epochs)
    1
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..data import as_loader
from ..errors import CstarError, CstarFloatingPointError, CstarRuntimeError, CstarTypeError, CstarValueError
from ..fileutil import atomic_save
from ..torchutil import model_device, private_rng
from . import distributed as D
from .config import TrainConfig
from .losses import adversarial_step

_log = logging.getLogger(__name__)

__all__ = ["finetune", "TrainHook", "TrainHistory", "RunDirError", "CHECKPOINT_NAME", "load_checkpoint", "recalibrate_bn"]

CHECKPOINT_NAME = "checkpoint.pt"
_FORMAT = "cstar-fx/checkpoint/1"


class RunDirError(CstarError, OSError):
    """The run folder cannot be created or written.

    Example:
        >>> isinstance(RunDirError("x"), OSError)
        True
    """


class TrainHook:
    """What :func:`~cstar_fx.robust.finetune` calls besides the loss; subclass and override what you need.

    ``penalty()`` is added to every step's loss; ``after_step()`` runs after each optimiser step;
    ``end_epoch(epoch)`` returns extra metrics to log; ``state_dict``/``load_state_dict`` travel in the
    checkpoint (tensors, numbers, strings, lists and dicts only: it is loaded with ``weights_only=True``).
    Under ``torch.distributed`` every rank runs every callback, and ``sync()`` is called on every rank
    after the weights are broadcast and after each callback, to make the hook's state rank 0's.

    Example:
        >>> TrainHook().penalty() is None
        True
    """

    def penalty(self) -> torch.Tensor | None:
        """An extra loss term (``None``: nothing to add)."""
        return None

    def after_step(self) -> None:
        """Called after each optimiser step."""

    def end_epoch(self, epoch: int) -> dict[str, float]:
        """Called after each epoch; the returned numbers are logged in the training history."""
        return {}

    def sync(self) -> None:
        """Distributed runs only: make this rank's state equal to rank 0's (a collective: every rank calls it)."""

    def state_dict(self) -> dict[str, Any]:
        """The hook's state for the checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` on resume."""


@dataclass
class TrainHistory:
    """Per-epoch metrics of a :func:`finetune` run.

    ``epochs`` holds one dict per finished epoch (``epoch``, ``loss``, ``acc`` on the inputs the loss
    scored, ``lr``, ``seconds`` and the hook's metrics); ``resumed_from`` is the number of epochs
    loaded from a checkpoint (``None`` for a fresh run).

    Example:
        >>> TrainHistory([{"epoch": 1, "loss": 0.5}]).last["loss"]
        0.5
    """

    epochs: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int | None = None

    @property
    def last(self) -> dict[str, float]:
        """The metrics of the last finished epoch (empty before the first)."""
        return self.epochs[-1] if self.epochs else {}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"epochs": list(self.epochs), "resumed_from": self.resumed_from}


def _prepare_run_dir(run_dir: str | os.PathLike[str]) -> Path:
    path = Path(run_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise RunDirError(f"run folder {str(path)!r} cannot be written ({exc.strerror or exc}); "
                          "pass a writable run_dir= (or run_dir=None for no checkpoints)") from None
    return path


def load_checkpoint(run_dir: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The checkpoint in ``run_dir`` (loaded with ``weights_only=True``), or ``None`` when there is none.

    Keys: ``epoch`` (finished epochs), ``model`` (state dict), ``optimizer``, ``scheduler``, ``hook``,
    ``history``, ``config``.

    Example:
        >>> load_checkpoint("/nonexistent") is None
        True
    """
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != _FORMAT:
        raise CstarValueError(f"{path} is not a cstar-fx training checkpoint; use another run_dir")
    return ckpt


def _size(data: Any) -> int | None:
    """Number of examples in ``data`` when it says so cheaply (a TensorData or an (x, y) pair), else None."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return int(data[0].shape[0]) if data[0].dim() else None
    try:
        return len(data) if hasattr(data, "tensors") else None
    except TypeError:
        return None


def _lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> Any:
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "step":
            return 0.01 if step >= 0.75 * total else 0.1 if step >= 0.5 * total else 1.0
        t = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    return factor


def _config_diff(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if key == "progress":
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


def _distributed_loader(loader: Any, w: D.World, train_data: Any) -> None:
    lo, hi = D.min_max(len(loader))
    if lo != hi:
        raise CstarValueError(f"the ranks have different numbers of batches per epoch ({lo} to {hi}), which would "
                              "deadlock the gradient all-reduce; shard a DataLoader with a DistributedSampler "
                              "(it pads every rank to the same length), or pass a TensorData")
    if (w.is_main and not hasattr(train_data, "loader") and not isinstance(train_data, (tuple, list))
            and not hasattr(getattr(train_data, "sampler", None), "set_epoch")):
        warnings.warn("distributed training on a loader without a DistributedSampler: every rank sees every "
                      "batch; give the DataLoader a DistributedSampler, or pass a TensorData", stacklevel=3)


def finetune(model: nn.Module, train_data: Any, cfg: TrainConfig | None = None, *,
             run_dir: str | os.PathLike[str] | None = None, resume: bool = False,
             device: str | torch.device | None = None, hook: TrainHook | None = None,
             sampler: Iterable[int] | None = None, distributed: bool | None = None,
             teacher: nn.Module | None = None) -> TrainHistory:
    """Train ``model`` in place with ``cfg.loss`` (PGD-AT by default) and SGD; returns the per-epoch history.

    ``train_data``: a :class:`~cstar_fx.data.TensorData`, an ``(x, y)`` tensor pair or a re-iterable of
    ``(x, y)`` batches (e.g. a ``DataLoader``) with inputs in [0, 1]. ``device`` defaults to the model's.
    With ``run_dir`` a checkpoint is written atomically after every epoch; ``resume=True`` continues
    from it (a fresh start when there is none) and refuses a checkpoint written with another config.
    ``hook`` adds a loss term and per-step/per-epoch callbacks (see :class:`TrainHook`). On CUDA the
    forward passes run under bf16 autocast (``cfg.amp``); on every device the model and batches use
    the channels_last memory format (``cfg.channels_last``), which also speeds up CPU training.

    Under ``torchrun`` (an initialised process group, unless ``distributed=False``) the model trains
    wrapped in ``DistributedDataParallel``: ``cfg.batch_size`` is the global batch, split evenly over
    the ranks (a :class:`~cstar_fx.data.TensorData` is sharded from one shared permutation; a
    ``DataLoader`` must bring its own ``DistributedSampler`` and its batches are per rank), attacks
    run per rank on the plain module, the hook's state is rank 0's (``hook.sync()``), the logged
    loss and accuracy are reduced over all ranks, and only rank 0 writes the checkpoint and shows
    progress. Call it on every rank; ``model`` ends with the same weights everywhere.

    ``teacher``: the model that ``cfg.loss.distill`` distils from (used in eval mode, never trained
    or moved; it must already be on ``device``).

    Example:
        >>> from cstar_fx.data import digits
        >>> from cstar_fx.models import small_cnn
        >>> from cstar_fx.robust import TrainConfig
        >>> model = small_cnn(width=8)
        >>> hist = finetune(model, digits()[0].subset(128), TrainConfig(epochs=1, batch_size=64), run_dir=None)
        >>> sorted(hist.last)[:3]
        ['acc', 'epoch', 'loss']
    """
    cfg = TrainConfig() if cfg is None else cfg
    if not isinstance(cfg, TrainConfig):
        raise CstarTypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    if not isinstance(model, nn.Module):
        raise CstarTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if cfg.loss.distill > 0 and teacher is None:
        raise CstarValueError(f"cfg.loss.distill={cfg.loss.distill:g} needs teacher=<the dense robust model>; "
                              "pass it, or set LossConfig(distill=0)")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise CstarTypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
    w = D.world(distributed)
    if run_dir is None:
        path = None
    else:  # only rank 0 writes; the others read the same folder on resume
        path = (_prepare_run_dir(run_dir) if w.is_main else Path(run_dir).expanduser()) / CHECKPOINT_NAME
    device = torch.device(device) if device is not None else model_device(model)
    cuda = device.type == "cuda"
    model.to(device)
    if teacher is not None and model_device(teacher) != device:
        raise CstarValueError(f"the teacher is on {model_device(teacher)}, training runs on {device}; "
                              f"move it first: teacher.to({str(device)!r})")
    if cfg.channels_last:  # NHWC: faster convolutions on GPUs and on CPUs (oneDNN), 1.6x measured on 2 cores
        model.to(memory_format=torch.channels_last)
    loader = as_loader(train_data, cfg.batch_size, True, device, seed=cfg.seed, sampler=sampler,
                       shard=(w.rank, w.size) if w.active else None)
    try:
        steps_per_epoch = len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise CstarTypeError("training data needs a length (number of batches per epoch) for the schedule; "
                             "use a TensorData, a DataLoader or a list of batches") from None
    if w.active:
        _distributed_loader(loader, w, train_data)
    if steps_per_epoch == 0:
        size = _size(train_data)
        if size == 0:
            raise CstarValueError("the training data is empty (0 examples); pass data with at least one batch")
        raise CstarValueError(f"no full training batch: {cfg.batch_size=} is larger than the dataset"
                              + (f" ({size} examples)" if size else "") + "; lower batch_size")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          nesterov=cfg.nesterov)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(cfg, steps_per_epoch))
    history = TrainHistory()
    start = 0
    ckpt = load_checkpoint(path.parent, map_location=device) if (resume and path is not None) else None
    if ckpt is not None:
        diffs = _config_diff(ckpt["config"], cfg.to_dict())
        if diffs:
            raise CstarValueError(f"the checkpoint in {path.parent} was written with another config "
                                  f"({'; '.join(diffs)}); resume with the same TrainConfig, or start a new run_dir")
        mine = model.state_dict()
        theirs = ckpt["model"]
        clash = ([f"{k!r} {tuple(theirs[k].shape)} vs {tuple(v.shape)}" for k, v in mine.items()
                  if k in theirs and hasattr(theirs[k], "shape") and theirs[k].shape != v.shape]
                 + [f"{k!r} missing" for k in mine if k not in theirs] + [f"{k!r} unexpected" for k in theirs if k not in mine])
        if clash:
            raise CstarValueError(f"the checkpoint in {path.parent} was written by a different model "
                                  f"({'; '.join(clash[:3])}{' ...' if len(clash) > 3 else ''}); "
                                  "resume with the model that wrote it, or start a new run_dir")
        model.load_state_dict(theirs)
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if hook is not None:
            if not ckpt["hook"] and hook.state_dict():
                raise CstarValueError(f"the checkpoint in {path.parent} was written without this hook "
                                      f"({type(hook).__name__}); start a new run_dir")
            hook.load_state_dict(ckpt["hook"])
        history = TrainHistory(list(ckpt["history"]), resumed_from=int(ckpt["epoch"]))
        start = int(ckpt["epoch"])
    if w.active and len(set(D.min_max(start))) > 1:
        raise CstarRuntimeError(f"the ranks found different checkpoints in {run_dir} (rank {w.rank} "
                                f"resumes after epoch {start}); put run_dir on a filesystem every rank sees")
    # The DDP constructor broadcasts rank 0's weights and buffers; the hook then takes rank 0's state.
    forward = D.wrap_ddp(model, device) if w.active else model
    if w.active and hook is not None:
        hook.sync()
    was_training = model.training
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if (cuda and cfg.amp) else contextlib.nullcontext()
    from tqdm.auto import tqdm

    try:
        for epoch in range(start, cfg.epochs):
            forward.train()
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            t0 = time.perf_counter()
            total_loss, correct, seen = 0.0, 0, 0
            with private_rng(device, D.rank_seed(cfg.seed * 1_000_003 + epoch, w.rank)):
                bar = tqdm(loader, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                           disable=not cfg.progress or not w.is_main, leave=False)
                for step, (x, y) in enumerate(bar):
                    if cfg.channels_last and x.ndim == 4:
                        x = x.contiguous(memory_format=torch.channels_last)
                    with amp:
                        out = adversarial_step(model, x, y, cfg.loss, forward=forward, teacher=teacher)
                    loss = out.loss
                    extra = hook.penalty() if hook is not None else None
                    if extra is not None:
                        loss = loss + extra
                    if not torch.isfinite(loss):
                        raise CstarFloatingPointError(f"training loss became {loss.item()} at epoch {epoch + 1}, step "
                                                      f"{step + 1}; lower lr, set grad_clip, or check the inputs lie "
                                                      "in [0, 1]")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    opt.step()
                    sched.step()
                    if hook is not None:
                        hook.after_step()
                        if w.active:
                            hook.sync()
                    n = y.shape[0]
                    total_loss += float(out.loss.detach()) * n
                    correct += int((out.logits.detach().argmax(1) == y).sum())
                    seen += n
                    bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
                bar.close()
                if w.active:
                    total_loss, correct, seen = D.all_reduce_sum([total_loss, correct, seen])
                    # Each rank's last forward updated its batch-norm statistics with its own shard; DDP
                    # would copy rank 0's at the next forward, so do it now for the hook and checkpoint.
                    D.broadcast_buffers(model)
                metrics = {"epoch": epoch + 1, "loss": total_loss / max(seen, 1), "acc": correct / max(seen, 1),
                           "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
                if hook is not None:
                    metrics.update({k: float(v) for k, v in hook.end_epoch(epoch).items()})
                    if w.active:
                        hook.sync()
            history.epochs.append(metrics)
            if w.is_main and _log.isEnabledFor(logging.INFO):  # for log files, where a tqdm bar leaves nothing
                shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k not in ("epoch", "seconds"))
                _log.info("epoch %d/%d: %s (%.0f s)", epoch + 1, cfg.epochs, shown, metrics["seconds"])
            if path is not None:
                if w.is_main:
                    atomic_save({"format": _FORMAT, "epoch": epoch + 1, "model": model.state_dict(),
                                  "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                  "hook": hook.state_dict() if hook is not None else {},
                                  "history": history.epochs, "config": cfg.to_dict()}, path)
                D.barrier()  # no rank starts the next epoch (or returns) before the checkpoint exists
    finally:
        model.train(was_training)
        del forward  # drops the DDP reducer and its gradient hooks
    return history


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: Any, batches: int = 20, batch_size: int = 128, *, seed: int = 0,
                   device: str | torch.device | None = None) -> int:
    """Re-estimate every batch-norm layer's running statistics on ``batches`` training batches; returns how many.

    After ``transform`` the factorized layers' outputs differ from the dense ones the statistics were
    measured on; re-estimating them (a forward pass per batch, no gradients) removes that mismatch
    before fine-tuning. Other weights are not touched; the model's training flag is restored; the
    caller's RNG is untouched. A model without batch norm is left as it is (returns 0).

    Example:
        >>> from cstar_fx.data import digits
        >>> from cstar_fx.models import small_cnn
        >>> recalibrate_bn(small_cnn(width=8), digits()[0], batches=2, batch_size=32)
        2
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise CstarValueError(f"batches must be an int >= 1, got {batches!r}")
    dev = torch.device(device) if device is not None else model_device(model)
    saved = [(m.momentum, m.training) for m in norms]
    was_training = model.training
    done = 0
    try:
        model.eval()
        for m in norms:  # cumulative average over the batches, from scratch
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with private_rng(dev, seed):
            for x, _ in as_loader(data, batch_size, True, dev, seed=seed):
                model(x)
                done += 1
                if done == batches:
                    break
    finally:
        for m, (momentum, training) in zip(norms, saved):
            m.momentum = momentum
            m.train(training)
        model.train(was_training)
    return done
