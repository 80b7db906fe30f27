"""``cstar-fx demo``: the whole pipeline on the embedded digits dataset, no arguments needed.

Trains a small CNN with PGD adversarial training on scikit-learn's 8x8 digits, compresses it with
the recommended recipe (:data:`cstar_fx.robust.RECOMMENDED`: channel pruning for part of the ratio and
a first fine-tune epoch on the pruned network, then data-aware factorization calibrated on clean and
adversarial training images, together the ratio smaller in parameters and FLOPs alike, then an
adversarial fine-tune) and with the plain transform (parameter budget) + adversarial fine-tune, both
with the same number of fine-tune epochs, evaluates clean and PGD-20 accuracy and prints one table.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections.abc import Iterator

from . import UsageError
from .options import MAX_SEED, integer, number

__all__ = ["register", "run", "DEMO_EPS"]

DEMO_EPS = 0.1  # L_inf radius on [0, 1] digits pixels (16 grey levels: 1.6 levels)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``demo`` sub-command.

    Example:
        >>> import argparse
        >>> p = argparse.ArgumentParser(); register(p.add_subparsers())
    """
    p = sub.add_parser("demo", help="robust-train a small CNN on digits, compress it with the recommended recipe and "
                                    "with plain transform + fine-tune, compare (no arguments needed)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # finite numbers here (NaN and Inf are refused with the flag's name); the ranges are checked in run()
    p.add_argument("--ratio", type=number(), default=8.0, help="compression ratio (parameters, dense / compressed)")
    p.add_argument("--seed", type=integer(at_least=0, at_most=MAX_SEED), default=0, help="random seed")
    p.add_argument("--epochs", type=int, default=10, help="teacher epochs, and the fine-tune epochs of each compression")
    p.add_argument("--eps", type=number(fractions=True), default=DEMO_EPS,
                   help="L_inf attack radius in [0, 1] pixel units (a fraction like 8/255 is fine)")
    p.set_defaults(func=run)


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    import torch

    # A 32-channel CNN on 8x8 images: intra-op threads cost more in synchronisation than they save,
    # and on a shared 2-core machine they thrash.
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(args: argparse.Namespace) -> int:
    """Run the pipeline and print the dense vs compressed table."""
    if not 1 < args.ratio < math.inf:
        raise UsageError(f"--ratio must be > 1, got {args.ratio:g}")
    if args.epochs < 2:
        raise UsageError(f"--epochs must be >= 2, got {args.epochs}")
    if not 0 < args.eps < 1:
        raise UsageError(f"--eps must be in (0, 1), got {args.eps:g}")
    import torch

    import cstar_fx
    from cstar_fx.data import digits
    from cstar_fx.models import small_cnn
    from cstar_fx.robust import (RECOMMENDED, AttackConfig, LossConfig, TrainConfig, compress, decompose_finetune,
                                 evaluate, finetune)

    t_start = time.perf_counter()
    train, test = digits(seed=args.seed)
    train_attack = AttackConfig(eps=args.eps, alpha=args.eps / 4, steps=5)
    eval_attack = AttackConfig(eps=args.eps, alpha=args.eps / 8, steps=20)
    loss = LossConfig("pgd", attack=train_attack)
    teacher_cfg = TrainConfig(epochs=args.epochs, batch_size=64, lr=0.05, loss=loss, seed=args.seed, progress=False)
    tune = TrainConfig(epochs=args.epochs, batch_size=64, lr=0.01, loss=loss, seed=args.seed, progress=False)
    recipe = RECOMMENDED
    rows = []
    with _threads(1):
        torch.manual_seed(args.seed)
        dense = small_cnn(in_channels=1, num_classes=10, width=32)
        try:  # the plain transform's reachability depends on shapes only: refuse now, not after training
            cstar_fx.plan_ranks(dense, args.ratio, round_to=1, example_inputs=train.x[:1])
        except cstar_fx.UnreachableBudgetError as exc:
            raise UsageError(f"--ratio {args.ratio:g}: " + str(exc).replace("\n", " ")) from None
        print(f"1/4 PGD-AT teacher on digits ({len(train)} train images, eps={args.eps:g}, {args.epochs} epochs)")
        finetune(dense, train, teacher_cfg)
        rows.append(("dense PGD-AT teacher", dense, 1.0, f"{args.epochs} ep"))
        steps = [f"channel pruning for {args.ratio ** recipe.prune:.3g}x"] if recipe.prune else []
        if recipe.prune_epochs:
            steps.append(f"{recipe.prune_epochs} fine-tune epoch(s) on the pruned network")
        pruning = " and ".join(steps) + ", then " if steps else ""
        print(f"2/4 recommended recipe at {args.ratio:g}x: {pruning}data-aware transform ({recipe.calibrate} "
              f"calibration images, budget {recipe.budget!r}) + adversarial fine-tune ({args.epochs} ep)")
        try:
            gm = compress(dense, train, args.ratio, tune, recipe=recipe, example_inputs=train.x[:1], round_to=1)
        except cstar_fx.UnreachableBudgetError as exc:
            raise UsageError(f"--ratio {args.ratio:g}: " + str(exc).replace("\n", " ")) from None
        rows.append((f"recipe {args.ratio:g}x", gm, cstar_fx.get_report(gm).ratio_params, f"+{args.epochs} ep"))
        print(f"3/4 plain transform at {args.ratio:g}x + adversarial fine-tune ({args.epochs} ep)")
        plain = decompose_finetune(dense, train, args.ratio, tune, round_to=1)
        rows.append((f"transform + FT {args.ratio:g}x", plain, cstar_fx.get_report(plain).ratio_params,
                     f"+{args.epochs} ep"))
        print(f"4/4 evaluating clean and PGD-20 accuracy on {len(test)} test images")
        results = [evaluate(m, test, attack=eval_attack, progress=False, seed=args.seed) for _, m, _, _ in rows]
    print()
    print(f"digits 8x8, L_inf eps={args.eps:g}, PGD-20 step {eval_attack.alpha:.4g}, {len(test)} test images")
    print(f"{'model':<24} {'params':>8} {'ratio':>7} {'training':>12} {'clean':>7} {'PGD-20':>7}  sanity")
    for (name, model, ratio, epochs), res in zip(rows, results):
        params = sum(p.numel() for p in model.parameters())
        sanity = "ok" if res.sanity.ok else "FAILED: " + ", ".join(res.sanity.failed)
        print(f"{name:<24} {params:>8,} {ratio:>6.2f}x {epochs:>12} {100 * res.clean:>6.2f}% {100 * res.pgd:>6.2f}%  {sanity}")
    print(f"\ntotal time {time.perf_counter() - t_start:.0f} s")
    return 0
