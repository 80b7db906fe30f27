"""``cstar-fx demo``: the zero-argument embedded default."""

from __future__ import annotations

import argparse

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``demo`` sub-command.

    Example:
        >>> import argparse
        >>> p = argparse.ArgumentParser(); register(p.add_subparsers())
    """
    p = sub.add_parser("demo", help="transform a small CNN at 8x and print the plan (no arguments needed)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ratio", type=float, default=8.0, help="compression ratio")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Plan and transform a CIFAR ResNet-18 at the ratio; print the plan and the achieved ratios."""
    import torch

    import cstar_fx
    from cstar_fx.models import cifar_resnet18

    torch.manual_seed(args.seed)
    model = cifar_resnet18().eval()
    x = torch.rand(1, 3, 32, 32)
    gm = cstar_fx.transform(model, args.ratio, example_inputs=x)
    print(cstar_fx.get_plan(gm))
    print()
    print(cstar_fx.get_report(gm))
    with torch.no_grad():
        diff = (gm(x) - model(x)).abs().max().item()
    print(f"\nmax |logit difference| on a random input at {args.ratio:g}x (untrained weights): {diff:.3g}")
    return 0
