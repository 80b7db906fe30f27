"""Record the input and output shapes of conv/linear nodes on an example input, without mutating the graph.

Unlike ``torch.fx.passes.shape_prop.ShapeProp`` this writes nothing into ``node.meta`` and runs the
model in eval mode (restoring every module's ``training`` flag), so batch-norm statistics are untouched.

Example:
    >>> import torch, torch.nn as nn
    >>> from cstar_fx.passes.trace import trace
    >>> gm = trace(nn.Sequential(nn.Conv2d(3, 4, 3, stride=2)))
    >>> shapes = record_shapes(gm, (torch.randn(1, 3, 9, 9),))
    >>> [out for _, out in shapes.values()]
    [(1, 4, 4, 4)]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ..errors import CstarError
from ..torchutil import as_tuple, eval_mode

__all__ = ["record_shapes", "ExampleInputError"]


class ExampleInputError(CstarError, ValueError):
    """The example inputs do not fit the model.

    Example:
        >>> isinstance(ExampleInputError("bad"), ValueError)
        True
    """


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, watch: set[fx.Node]) -> None:
        super().__init__(gm)
        self.watch = watch
        self.shapes: dict[fx.Node, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n in self.watch and isinstance(out, torch.Tensor):
            x = n.args[0] if n.args else n.kwargs.get("input")
            x_val = self.env.get(x) if isinstance(x, fx.Node) else None
            in_shape = tuple(x_val.shape) if isinstance(x_val, torch.Tensor) else ()
            self.shapes[n] = (in_shape, tuple(out.shape))
        return out


def record_shapes(gm: fx.GraphModule, example_inputs: Any,
                  nodes: set[fx.Node] | None = None) -> dict[fx.Node, tuple[tuple[int, ...], tuple[int, ...]]]:
    """``{node: (input shape, output shape)}`` for the given nodes (default: all call nodes).

    Raises :class:`ExampleInputError` when the model cannot run on the inputs.

    Example:
        >>> import torch, torch.fx
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 2)))
        >>> [shapes for shapes in record_shapes(gm, torch.randn(3, 4)).values()]
        [((3, 4), (3, 2))]
    """
    args = as_tuple(example_inputs)
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.numel() == 0:
            raise ExampleInputError(f"example_inputs[{i}] has shape {tuple(a.shape)} and no elements, so every FLOP "
                                    f"count would be 0; pass at least one sample, e.g. torch.randn(1, 3, 32, 32)")
    watch = nodes if nodes is not None else {n for n in gm.graph.nodes if n.op.startswith("call")}
    rec = _Recorder(gm, watch)
    try:
        with torch.no_grad(), eval_mode(gm):
            rec.run(*args)
    except Exception as exc:
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
        raise ExampleInputError(
            f"the model cannot run on example_inputs of shape(s) {shapes}: {type(exc).__name__}: {exc}. "
            f"Pass inputs shaped like real data, e.g. torch.randn(1, 3, 32, 32) for a CIFAR model."
        ) from exc
    return rec.shapes
