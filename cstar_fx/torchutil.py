"""Small helpers over PyTorch modules and inputs that every part of cstar_fx uses (passes, training, export).

Example:
    >>> import torch, torch.nn as nn
    >>> m = nn.Sequential(nn.Dropout()).train()
    >>> with eval_mode(m):
    ...     m.training
    False
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
from .errors import CstarTypeError

__all__ = ["eval_mode", "as_tuple", "pair", "model_device", "private_rng"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own ``training`` flag afterwards.

    Example:
        >>> m = nn.Sequential(nn.BatchNorm1d(2)).train()
        >>> with eval_mode(m):
        ...     m.training
        False
        >>> m.training
        True
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    """Normalise example inputs: a tensor becomes a 1-tuple.

    Example:
        >>> len(as_tuple(torch.zeros(1)))
        1
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise CstarTypeError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters).

    Example:
        >>> model_device(nn.Linear(2, 2))
        device(type='cpu')
    """
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def private_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the random generators (CPU, and ``device`` when it is a GPU) inside the block only, so that
    what runs there is reproducible and the caller's random stream is left as it was.

    Example:
        >>> with private_rng(torch.device("cpu"), 0):
        ...     a = torch.rand(1)
        >>> with private_rng(torch.device("cpu"), 0):
        ...     b = torch.rand(1)
        >>> bool(a == b)
        True
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def pair(v: Any) -> tuple[int, int]:
    """An int or a pair (tuple/list) as a pair of ints: a conv's stride, padding or dilation per spatial axis.

    Example:
        >>> pair(2), pair((1, 3))
        ((2, 2), (1, 3))
    """
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[-1]))
