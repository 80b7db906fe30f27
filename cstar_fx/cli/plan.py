"""``cstar-fx plan``: print the rank plan for a torchvision model at a ratio (no data needed)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..schemes import DEFAULT_CONV, conv_scheme_names
from . import UsageError
from .options import check_output, integer, number, write_output

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``plan`` sub-command.

    Example:
        >>> import argparse
        >>> p = argparse.ArgumentParser(); register(p.add_subparsers())
    """
    p = sub.add_parser("plan", help="print the rank plan for a model and ratio",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="resnet18", help="torchvision model name")
    p.add_argument("--num-classes", type=integer(at_least=1), default=10, help="classifier outputs")
    p.add_argument("--stem", choices=("cifar", "imagenet"), default="cifar", help="input stem / resolution")
    p.add_argument("--ratio", type=number(above=1), default=8.0, help="compression ratio (dense / compressed)")
    p.add_argument("--budget", choices=("params", "flops"), default="params", help="what the ratio counts")
    p.add_argument("--round-to", type=integer(at_least=1), default=8, help="ranks are multiples of this")
    p.add_argument("--skip", nargs="*", default=[], help="layer names or glob patterns kept dense")
    p.add_argument("--conv-scheme", choices=conv_scheme_names(), default=DEFAULT_CONV, help="scheme for kxk convs")
    p.add_argument("--unpack-attention", action="store_true",
                   help="factorize nn.MultiheadAttention projections too (ViTs; use --stem imagenet)")
    p.add_argument("--json", type=Path, default=None, help="also write the plan as JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the model, plan it and print the table."""
    import torch

    import cstar_fx
    from cstar_fx.models import build_model

    if args.json is not None:
        check_output(args.json, "--json", example="plan.json")
    try:
        model = build_model(args.model, num_classes=args.num_classes, stem=args.stem)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    size = 32 if args.stem == "cifar" else 224
    try:
        plan = cstar_fx.plan_ranks(model, args.ratio, budget=args.budget, round_to=args.round_to,
                                   skip=tuple(args.skip), conv_scheme=args.conv_scheme,
                                   unpack_attention=args.unpack_attention,
                                   example_inputs=torch.randn(1, 3, size, size))
    except (ValueError, TypeError) as exc:  # unreachable ratio, a skip pattern or scheme the planner refuses
        raise UsageError(str(exc).replace("\n", " ")) from None
    print(plan)
    if args.json:
        write_output(args.json, plan.to_json(), "--json")
        print(f"plan written to {args.json}")
    return 0
