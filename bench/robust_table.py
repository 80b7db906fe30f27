"""The paper-style robustness table: CIFAR-10 (JPEG q75), CIFAR ResNet-18, a PGD-AT teacher compressed at 8x/16x/32x.

Rows: the teacher, then per ratio (i) CSTAR (ADMM joint training + transform + adversarial fine-tune),
(ii) transform + adversarial fine-tune, (iii) Torch-Pruning L2 channel pruning + adversarial fine-tune
(skipped with a note when ``cstar_fx.passes.prune`` is unavailable). All compressed models get the
same fine-tune recipe; CSTAR's ADMM phase is extra and reported in the "training" column. Columns:
clean accuracy, PGD-20 on ``--pgd-n`` test images, AutoAttack (standard) on ``--aa-n`` (needs
``pip install 'cstar-fx[robust]'``; reported as "n/a" otherwise), and the sanity-check verdict.

    python bench/robust_table.py            # the full table (GPU: about 10 minutes per part on an H200)
    python bench/robust_table.py --smoke    # same code, 300 images, CPU, ratio 8 only (add --ratios 8 16 32)

Writes ``bench/out/robust_table[_smoke].json`` and ``.md``. Checkpoints go to ``--runs``
(default ``bench/out/runs/robust_table``); ``--resume`` continues a killed run.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, write  # noqa: E402

import cstar_fx  # noqa: E402
from cstar_fx.data import cifar10_jpeg  # noqa: E402
from cstar_fx.models import cifar_resnet18  # noqa: E402
from cstar_fx.robust import (AdmmConfig, AttackConfig, JointConfig, LossConfig, TrainConfig, cstar,  # noqa: E402
                             decompose_finetune, evaluate, finetune)

EPS, STEP = 8 / 255, 2 / 255


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a few hundred images on the CPU, tiny budgets (CI)")
    p.add_argument("--archive", type=Path, default=None, help="cifar10-jpeg.tar.xz (default: ../shared/data)")
    p.add_argument("--cache-dir", type=Path, default=None, help="where the decoded dataset is cached")
    p.add_argument("--runs", type=Path, default=OUT / "runs" / "robust_table", help="checkpoint folders")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --runs")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--ratios", type=float, nargs="+", default=None,
                   help="compression ratios (params); default 8 16 32, or 8 with --smoke")
    p.add_argument("--methods", nargs="+", default=["cstar", "decompose", "prune"],
                   choices=["cstar", "decompose", "prune"], help="compression methods")
    p.add_argument("--teacher-epochs", type=int, default=30, help="PGD-AT epochs of the dense teacher")
    p.add_argument("--joint-epochs", type=int, default=10, help="CSTAR ADMM joint-training epochs")
    p.add_argument("--ft-epochs", type=int, default=10, help="adversarial fine-tune epochs (every method)")
    p.add_argument("--batch-size", type=int, default=512, help="training batch size")
    p.add_argument("--train-steps", type=int, default=10, help="PGD steps in adversarial training")
    p.add_argument("--pgd-n", type=int, default=2000, help="test images for clean and PGD-20 accuracy")
    p.add_argument("--aa-n", type=int, default=500, help="test images for AutoAttack")
    p.add_argument("--rho", type=float, default=1.0, help="CSTAR ADMM rho")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    args = p.parse_args(argv)
    if args.ratios is None:
        args.ratios = [8.0] if args.smoke else [8.0, 16.0, 32.0]
    if args.smoke:
        args.teacher_epochs, args.joint_epochs, args.ft_epochs = 1, 1, 1
        args.batch_size, args.train_steps, args.pgd_n, args.aa_n = 50, 2, 32, 8
        args.device = "cpu" if args.device == "auto" else args.device
        args.runs = args.runs.with_name(args.runs.name + "_smoke")
    return args


def _train_cfg(args: argparse.Namespace, epochs: int, lr: float) -> TrainConfig:
    attack = AttackConfig(eps=EPS, alpha=STEP if not args.smoke else EPS / 2, steps=args.train_steps)
    return TrainConfig(epochs=epochs, batch_size=args.batch_size, lr=lr, momentum=0.9, weight_decay=5e-4,
                       schedule="cosine", loss=LossConfig("pgd", attack=attack), seed=args.seed, progress=True)


def _prune_fn() -> Any:
    try:
        from cstar_fx.passes.prune import prune_to_ratio
    except ImportError as exc:
        print(f"note: Torch-Pruning baseline skipped: cstar_fx.passes.prune.prune_to_ratio unavailable ({exc})")
        return None
    return prune_to_ratio


def main(argv: list[str] | None = None) -> int:
    """Build the table; returns 0."""
    args = _args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.manual_seed(args.seed)
    t_all = time.perf_counter()
    per_class = (20, 10) if args.smoke else None
    train, test = cifar10_jpeg(args.archive, cache_dir=args.cache_dir, per_class=per_class)
    if device.type == "cuda":
        train, test = train.to(device), test.to(device)  # batches and augmentation stay on the GPU
    print(f"data: CIFAR-10 (JPEG q75), {len(train)} train / {len(test)} test images; device {device}")
    example = torch.rand(1, 3, 32, 32, device=device)
    attack = AttackConfig(eps=EPS, alpha=STEP, steps=20)
    try:
        import pyautoattack  # noqa: F401
        attacks: tuple[str, ...] = ("pgd", "autoattack")
    except ImportError:
        attacks = ("pgd",)
        print("note: AutoAttack skipped: pip install 'cstar-fx[robust]' to add it")

    rows: list[dict[str, Any]] = []

    def record(method: str, ratio: float, model: torch.nn.Module, training: str, seconds: float) -> None:
        res = evaluate(model, test, attacks=attacks, attack=attack, n=args.pgd_n, autoattack_n=args.aa_n,
                       sanity_n=16 if args.smoke else 256, seed=args.seed)
        params = sum(p.numel() for p in model.parameters())
        row = {"method": method, "ratio target": f"{ratio:g}x" if ratio > 1 else "-", "params": params,
               "ratio params": dense_params / params, "ratio FLOPs": dense_flops / cstar_fx.count_flops(model, example),
               "training": training, "clean %": 100 * res.clean, "PGD-20 %": 100 * res.pgd,
               "AutoAttack %": 100 * res.robust["autoattack"] if "autoattack" in res.robust else "n/a",
               "sanity": "ok" if res.sanity.ok else "FAILED " + ",".join(res.sanity.failed),
               "train s": seconds, "eval s": res.seconds, "result": res.to_dict()}
        rows.append(row)
        print(f"{method:<22} {row['ratio target']:>5} params {params:>10,} clean {row['clean %']:6.2f}% "
              f"PGD-20 {row['PGD-20 %']:6.2f}% AA {row['AutoAttack %']} ({row['sanity']})", flush=True)

    teacher = cifar_resnet18().to(device)
    dense_params = sum(p.numel() for p in teacher.parameters())
    dense_flops = cstar_fx.count_flops(teacher, example)
    t0 = time.perf_counter()
    finetune(teacher, train, _train_cfg(args, args.teacher_epochs, 0.2 if not args.smoke else 0.05),
             run_dir=args.runs / "teacher", resume=args.resume)
    record("dense PGD-AT teacher", 1.0, teacher, f"{args.teacher_epochs} ep", time.perf_counter() - t0)

    tune = _train_cfg(args, args.ft_epochs, 0.02)
    joint = JointConfig(joint=_train_cfg(args, args.joint_epochs, 0.02), finetune=tune, admm=AdmmConfig(rho=args.rho))
    prune = _prune_fn() if "prune" in args.methods else None
    for ratio in args.ratios:
        tag = f"{ratio:g}x"
        if "cstar" in args.methods:
            t0 = time.perf_counter()
            gm = cstar(teacher, train, ratio, joint, run_dir=args.runs / f"cstar_{tag}", resume=args.resume)
            record("CSTAR (ADMM + FT)", ratio, gm, f"+{args.joint_epochs}+{args.ft_epochs} ep", time.perf_counter() - t0)
        if "decompose" in args.methods:
            t0 = time.perf_counter()
            gm = decompose_finetune(teacher, train, ratio, tune, run_dir=args.runs / f"decompose_{tag}", resume=args.resume)
            record("transform + FT", ratio, gm, f"+{args.ft_epochs} ep", time.perf_counter() - t0)
        if prune is not None:
            t0 = time.perf_counter()
            pruned = prune(copy.deepcopy(teacher), ratio, example, importance="l2", round_to=8)
            finetune(pruned, train, tune, run_dir=args.runs / f"prune_{tag}", resume=args.resume)
            record("Torch-Pruning L2 + FT", ratio, pruned, f"+{args.ft_epochs} ep", time.perf_counter() - t0)

    name = "robust_table_smoke" if args.smoke else "robust_table"
    columns = ["method", "ratio target", "params", "ratio params", "ratio FLOPs", "training", "clean %", "PGD-20 %",
               "AutoAttack %", "sanity"]
    meta = {"dataset": f"CIFAR-10 (JPEG q75), {len(train)} train images, first {min(args.pgd_n, len(test))} test images "
                       f"(AutoAttack: first {min(args.aa_n, len(test))})",
            "model": "CIFAR ResNet-18 (3x3 stem, no max-pool, input normalisation inside)",
            "threat model": "L_inf eps 8/255; evaluation PGD-20 step 2/255 (1 restart), AutoAttack standard",
            "training": f"PGD-{args.train_steps} AT, SGD momentum 0.9, wd 5e-4, cosine, batch {args.batch_size}; "
                        f"teacher {args.teacher_epochs} ep lr {0.2 if not args.smoke else 0.05}; joint/fine-tune lr 0.02; "
                        f"ADMM rho {args.rho} (x1.25 per epoch, max 10), refreshed once per epoch",
            "device": str(device), "smoke": args.smoke, "wall s": round(time.perf_counter() - t_all, 1)}
    md = write(name, rows, columns, meta)
    print("\n" + md)
    print(f"written {OUT / (name + '.json')} and .md in {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
