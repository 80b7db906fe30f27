"""Robust compression at equal training compute: CIFAR-10 (JPEG q75), CIFAR ResNet-18, mean +- std over seeds.

For every seed a dense PGD-AT teacher is trained once and cached; every method then compresses that
same teacher to each ratio and gets the same number of adversarial training epochs (a CSTAR joint
epoch counts as one), the same optimiser, schedule, batch-norm re-estimation and evaluation. Each
(seed, method, ratio) cell is written to its own JSON file as it finishes, so a killed run resumes
where it stopped (the running fine-tune itself resumes from its last epoch).

    python bench/robust_table.py --profile cpu     # 2-core CPU: ResNet-18 width 16, 10k images, 5 seeds
    python bench/robust_table.py --profile gpu     # paper size: width 64, all 50k images, 30-epoch teacher
    python bench/robust_table.py --profile smoke   # a minute on the CPU; checks the code path (CI-sized)
    python bench/robust_table.py --profile cpu --report   # only rebuild the table from the finished cells
    bench/run_cpu_table.sh                         # the CPU table in the order that answers the question first

Methods (``--methods``, run in the order given; ``LABELS`` says what each is): the baselines
``transform_ft`` (weight-SVD/Tucker-2 plan + adversarial fine-tune), ``prune_ft`` (Torch-Pruning L2
global channel pruning at equal parameters + the same fine-tune), ``prune_both`` (the same pruning at
least ``r`` times smaller in FLOPs *and* parameters, as ``cstar-fx compress`` prunes) and ``uniform_ft``
(the same fraction of every layer's ranks); the library's recipe ``both_data`` (data-aware factors,
``budget="both"``); the levers ``data_ft`` / ``data_distill`` / ``transform_distill`` /
``prune_distill`` (data-aware factors calibrated on clean and adversarial training images; robust
distillation from the teacher), ``flops_ft`` / ``flops_data`` (a FLOP-budget plan at equal parameters),
``hybrid_ft`` / ``hybrid_both`` (channel pruning for ``sqrt(r)``, then data-aware low rank for the rest,
at equal parameters / at ``budget="both"``; ``hybrid25_both`` / ``hybrid75_both`` prune ``r ** 0.25`` /
``r ** 0.75``; ``hybrid_staged`` spends the first fine-tune epoch on the pruned network before factorizing
it; ``staged_distill`` is that with the distilling fine-tune), ``sens_distill`` / ``sens_both`` (ranks weighted by each layer's measured sensitivity of the adversarial loss;
the second is ``both_data`` with that weighting), ``cstar`` (ADMM joint epochs on the dense weights, then transform
and fine-tune, same total epochs; the ranks fixed at the start), ``cstar_euclid`` (the same with the Euclidean
Z-step: the ranks re-planned as the projection onto the budget at every refresh) and ``transform_spatial``
(``transform_ft`` with spatial SVD for the kxk convs). Writes
``bench/out/robust_table_<profile>.json`` and ``.md``: every cell, mean +- std per method and ratio, and per-seed
paired differences of ``--reference`` (default: the recipe) against every other method. ``--autoattack`` adds
AutoAttack (the CPU profile: its APGD-CE and APGD-T) to the finished cells of the methods in ``AA_METHODS``;
``--heldout`` adds clean and PGD-20 accuracy on the profile's held-out test images (the ones after the table's own
in each class) and ``--confirm`` on its confirmation images (the ones after those), each with its own paired
differences. The held-out images have chosen between recipes; the confirmation images are kept for checking such a
choice once it is made. ``--unseen``, ``--fresh`` and ``--reserve`` score training images no model trains on (the
ones after the table's training images, then the ones after those, and so on); ``--reserve`` scores its images in
five blocks, and the paired table then also gives the evaluation noise in each paired difference (its spread over
the blocks). ``--ft-epochs N`` gives every method N adversarial epochs instead of the profile's, on the same
teachers, in its own cells (``seed*/ftN/``) and table. ``--teacher-epochs N`` trains other teachers (N epochs), so
the whole run (teachers, cells, table) goes to its own folder ``robust_<profile>_tN``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, markdown_table, write  # noqa: E402

import cstar_fx  # noqa: E402
from cstar_fx.data import cifar10_jpeg  # noqa: E402
from cstar_fx.fileutil import atomic_path  # noqa: E402
from cstar_fx.models import cifar_resnet18  # noqa: E402
from cstar_fx.robust import (AdmmConfig, AttackConfig, JointConfig, LossConfig, TrainConfig, cstar,  # noqa: E402
                             decompose_finetune, evaluate, finetune, recalibrate_bn)

EPS = 8 / 255
PGD20 = AttackConfig(eps=EPS, alpha=2 / 255, steps=20)  # the table's PGD-20, on every split
RECOMMENDED = "hybrid_staged"  # the library's RECOMMENDED recipe (cstar_fx.robust.RECOMMENDED)


@dataclass(frozen=True)
class Profile:
    """One size of the benchmark."""

    width: int
    train_per_class: int | None
    test_per_class: int | None
    teacher_epochs: int
    ft_epochs: int
    joint_epochs: int
    batch_size: int
    train_steps: int
    train_alpha: float
    teacher_lr: float
    ft_lr: float
    pgd_n: int
    aa_n: int
    calibrate: int
    distill: float
    ratios: tuple[float, ...]
    seeds: tuple[int, ...]
    sanity_n: int = 128
    aa_attack: str = "autoattack"  # or "apgd": AutoAttack's APGD-CE + APGD-T only (a tenth of the CPU time)
    heldout_per_class: int = 0  # --heldout: test images per class after the first test_per_class
    confirm_per_class: int = 0  # --confirm: test images per class after the held-out ones
    unseen_per_class: int = 0  # --unseen: training images per class after the first train_per_class (never trained on)
    fresh_per_class: int = 0  # --fresh: training images per class after the unseen ones (never trained on)
    reserve_per_class: int = 0  # --reserve: training images per class after the fresh ones (never trained on)


PROFILES = {
    # 2 CPU cores: ~15 min per teacher, ~3 min per cell and ~1 min per APGD (measured numbers in docs/benchmarks.md)
    "cpu": Profile(width=16, train_per_class=1000, test_per_class=100, teacher_epochs=10, ft_epochs=3,
                   joint_epochs=1, batch_size=128, train_steps=2, train_alpha=4 / 255, teacher_lr=0.1, ft_lr=0.05,
                   pgd_n=1000, aa_n=200, calibrate=512, distill=0.8, ratios=(16.0, 32.0), seeds=(0, 1, 2, 3, 4),
                   aa_attack="apgd", heldout_per_class=400, confirm_per_class=500, unseen_per_class=500,
                   fresh_per_class=200, reserve_per_class=1000),
    "gpu": Profile(width=64, train_per_class=None, test_per_class=None, teacher_epochs=30, ft_epochs=10,
                   joint_epochs=3, batch_size=512, train_steps=10, train_alpha=2 / 255, teacher_lr=0.2, ft_lr=0.02,
                   pgd_n=2000, aa_n=500, calibrate=2048, distill=0.8, ratios=(8.0, 16.0, 32.0), seeds=(0, 1, 2),
                   sanity_n=256),
    "smoke": Profile(width=8, train_per_class=20, test_per_class=10, teacher_epochs=1, ft_epochs=2, joint_epochs=1,
                     batch_size=50, train_steps=1, train_alpha=8 / 255, teacher_lr=0.05, ft_lr=0.02, pgd_n=32, aa_n=0,
                     calibrate=64, distill=0.8, ratios=(8.0,), seeds=(0, 1), sanity_n=16),
}

METHODS = ("transform_ft", "prune_ft", "data_distill", "prune_distill", "data_ft", "transform_distill",
           "uniform_ft", "cstar", "sens_distill", "flops_ft", "hybrid_ft",
           "flops_data", "both_data", "prune_both", "hybrid_both", "hybrid25_both", "hybrid75_both", "hybrid_staged",
           "sens_both", "gradual_both", "sens_staged", "cstar_euclid", "staged_distill", "transform_spatial")
LABELS = {
    "teacher": "dense PGD-AT teacher",
    "transform_ft": "transform + FT",
    "prune_ft": "Torch-Pruning L2 + FT",
    "data_distill": "data-aware transform + distill FT",
    "prune_distill": "Torch-Pruning L2 + distill FT",
    "data_ft": "data-aware transform + FT",
    "transform_distill": "transform + distill FT",
    "uniform_ft": "uniform ranks + FT",
    "cstar": "CSTAR (ADMM joint + FT)",
    "cstar_euclid": "CSTAR, Euclidean Z-step (ADMM joint + FT)",
    "sens_distill": "data-aware + sensitivity-weighted ranks + distill FT",
    "flops_ft": "transform, FLOP-budget plan at equal params + FT",
    "hybrid_ft": "prune sqrt(r) + data-aware low rank + FT",
    "flops_data": "data-aware transform, FLOP-budget plan at equal params + FT",
    "both_data": "data-aware transform, >= r fewer FLOPs and params + FT",
    "prune_both": "Torch-Pruning L2, >= r fewer FLOPs and params + FT",
    "hybrid_both": "prune r^0.5 + data-aware low rank, >= r fewer FLOPs and params + FT",
    "hybrid25_both": "prune r^0.25 + data-aware low rank, >= r fewer FLOPs and params + FT",
    "hybrid75_both": "prune r^0.75 + data-aware low rank, >= r fewer FLOPs and params + FT",
    "hybrid_staged": "prune r^0.5, FT 1 epoch, then data-aware low rank, >= r fewer FLOPs and params "
                     "+ FT the other epochs",
    "sens_both": "data-aware transform, sensitivity-weighted ranks, >= r fewer FLOPs and params + FT",
    "gradual_both": "data-aware low rank at sqrt(r), FT 1 epoch, then re-truncated to r, >= r fewer FLOPs and params "
                    "+ FT the other epochs",
    "sens_staged": "the recipe (hybrid_staged) with sensitivity-weighted ranks",
    "staged_distill": "the recipe (hybrid_staged) + distill FT",
    "transform_spatial": "transform with spatial SVD for kxk convs + FT",
}
class Staged(NamedTuple):
    """A method that prunes first: the budget, the share of the compression (in log terms) given to pruning, the
    number of the fine-tune's epochs spent on the pruned network before it is factorized, whether the
    factorization's ranks are weighted by the layers' measured sensitivity, and whether the fine-tune distils."""

    budget: str
    share: float
    epochs: int
    sensitivity: bool = False
    distill: bool = False


PRUNED_FIRST = {"hybrid_ft": Staged("params", 0.5, 0), "hybrid_both": Staged("both", 0.5, 0),
                "hybrid25_both": Staged("both", 0.25, 0), "hybrid75_both": Staged("both", 0.75, 0),
                "hybrid_staged": Staged("both", 0.5, 1), "sens_staged": Staged("both", 0.5, 1, sensitivity=True),
                "staged_distill": Staged("both", 0.5, 1, distill=True)}
AA_METHODS = ("transform_ft", "prune_ft", "data_distill", "prune_distill", "hybrid_ft", "flops_ft", "data_ft",
              "flops_data", "both_data", "prune_both", "hybrid_both", "hybrid25_both", "hybrid75_both", "hybrid_staged",
              "gradual_both", "sens_staged", "staged_distill", "transform_spatial")
AA_LABELS = {"autoattack": "AutoAttack", "apgd": "APGD-CE+T"}


class Split(NamedTuple):
    """Images scored after training, from ``source`` ("test" or "train"): per class, the ones after the table's
    own (the first ``test_per_class`` / ``train_per_class``) and after the earlier splits of the same source."""

    label: str
    source: str
    # scored in this many class-balanced blocks of equal size, whose accuracies are stored too: the spread of a
    # paired difference over the blocks is the evaluation noise in it, apart from the seed-to-seed spread
    blocks: int = 1


# in this order; result keys "clean <name>" / "pgd20 <name>" (and "... blocks"), sizes the profile's "<name>_per_class"
SPLITS = {"heldout": Split("held-out", "test"), "confirm": Split("confirmation", "test"),
          "unseen": Split("unseen training", "train"), "fresh": Split("fresh training", "train"),
          "reserve": Split("reserve training", "train", blocks=5)}


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu", help="benchmark size")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods, run in this order")
    p.add_argument("--ratios", type=float, nargs="+", default=None, help="parameter ratios (default: the profile's)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the profile's)")
    p.add_argument("--archive", type=Path, default=None, help="cifar10-jpeg.tar.xz (default: ../shared/data)")
    p.add_argument("--cache-dir", type=Path, default=None, help="where the decoded dataset is cached")
    p.add_argument("--runs", type=Path, default=None, help="cell folder (default bench/out/runs/robust_<profile>)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--aa-n", type=int, default=None, help="AutoAttack images (0: none; default: the profile's)")
    p.add_argument("--report", action="store_true", help="only rebuild the table from finished cells")
    p.add_argument("--reference", choices=METHODS, default=RECOMMENDED,
                   help="the method whose paired differences to every other method are tabled")
    p.add_argument("--autoattack", action="store_true",
                   help="add AutoAttack to the finished cells of the main methods (models rebuilt from their checkpoints)")
    p.add_argument("--heldout", action="store_true",
                   help="add clean and PGD-20 accuracy on the held-out test images (the profile's heldout_per_class "
                        "per class after the ones the table uses) to the finished cells of --methods; the paired "
                        "differences are then also given on them")
    p.add_argument("--confirm", action="store_true",
                   help="the same on the confirmation test images (the profile's confirm_per_class per class after "
                        "the held-out ones), for checking a choice made on the held-out images")
    p.add_argument("--unseen", action="store_true",
                   help="the same on training images no model was trained on (the profile's unseen_per_class per "
                        "class after the ones the table trains on)")
    p.add_argument("--fresh", action="store_true",
                   help="the same on the training images after the unseen ones (the profile's fresh_per_class per "
                        "class), kept for the verdict of a run with --ft-epochs")
    p.add_argument("--reserve", action="store_true",
                   help="the same on the training images after the fresh ones (the profile's reserve_per_class per "
                        "class), scored in five blocks so that the evaluation noise of each paired difference is "
                        "measured too")
    p.add_argument("--aa-split", choices=list(SPLITS), default=None,
                   help="AutoAttack (the profile's: APGD-CE+T on the CPU) on --aa-n images of this split instead of the "
                        "table's test images (the first --aa-n / 10 of each class), for the finished cells of the main "
                        "methods; implies that split's flag")
    p.add_argument("--ft-epochs", type=int, default=None,
                   help="adversarial epochs per method instead of the profile's (same teachers; its cells go to "
                        "seed*/ft<N>/ and its table to robust_table_<profile>_ft<N>)")
    p.add_argument("--teacher-epochs", type=int, default=None,
                   help="teacher epochs instead of the profile's: other teachers, so everything (teachers, cells, "
                        "table) goes to robust_<profile>_t<N> (runs and table name)")
    p.add_argument("--handoff", action="store_true",
                   help="evaluate each method's compressed model before its fine-tune (batch norm re-estimated), into "
                        "seed*/handoff/ and robust_table_<profile>_handoff.md (the same teachers; CSTAR excluded)")
    args = p.parse_args(argv)
    prof = PROFILES[args.profile]
    args.ratios = tuple(args.ratios or prof.ratios)
    args.seeds = tuple(args.seeds if args.seeds is not None else prof.seeds)
    if args.teacher_epochs is not None and args.teacher_epochs < 1:
        p.error(f"--teacher-epochs must be >= 1, got {args.teacher_epochs}")
    # other teachers make a separate benchmark: its own run folder and table name
    args.teachers = f"_t{args.teacher_epochs}" if args.teacher_epochs not in (None, prof.teacher_epochs) else ""
    args.runs = args.runs or OUT / "runs" / f"robust_{args.profile}{args.teachers}"
    if args.threads < 1:
        p.error("--threads must be >= 1")
    if args.aa_split:
        setattr(args, args.aa_split, True)
    args.splits = tuple(s for s in SPLITS if getattr(args, s))
    joint = [m for m in args.methods if m.startswith("cstar")]
    if args.handoff and (args.autoattack or args.aa_split or args.splits or joint or args.ft_epochs is not None):
        p.error("--handoff evaluates the compressed models before training: drop --autoattack, --heldout, --confirm, "
                "--unseen, --fresh, --reserve, --ft-epochs and the cstar methods")
    if args.ft_epochs is not None and args.ft_epochs <= prof.joint_epochs:
        p.error(f"--ft-epochs must be > the profile's {prof.joint_epochs} CSTAR joint epoch(s), got {args.ft_epochs}")
    # the cells' folder under seed*/ and the table's name suffix: the profile's own fine-tune has none
    args.variant = "handoff" if args.handoff else (
        f"ft{args.ft_epochs}" if args.ft_epochs not in (None, prof.ft_epochs) else "")
    if args.handoff:  # the same cells without their fine-tune
        args.ft_epochs = 0
    return args


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Bench:
    """The teacher, the data and the shared recipe of one seed; each method is a method of this class."""

    def __init__(self, args: argparse.Namespace, prof: Profile, seed: int, train: Any, test: Any,
                 device: torch.device) -> None:
        self.args, self.prof, self.seed, self.train, self.test, self.device = args, prof, seed, train, test, device
        self.dir = args.runs / f"seed{seed}"
        self.cells = self.dir / args.variant
        self.example = torch.rand(1, 3, 32, 32, device=device)
        self.attack = AttackConfig(eps=EPS, alpha=prof.train_alpha, steps=prof.train_steps)
        torch.manual_seed(seed)  # the teacher's initialisation
        self.teacher = cifar_resnet18(width=prof.width).to(device)

    def cfg(self, epochs: int, lr: float, distill: float = 0.0, schedule: str = "cosine") -> TrainConfig:
        return TrainConfig(epochs=epochs, batch_size=self.prof.batch_size, lr=lr, momentum=0.9, weight_decay=5e-4,
                           schedule=schedule, loss=LossConfig("pgd", attack=self.attack, distill=distill),
                           seed=self.seed, progress=sys.stderr.isatty())

    @property
    def ft(self) -> TrainConfig:
        return self.cfg(self.prof.ft_epochs, self.prof.ft_lr)

    @property
    def ft_distill(self) -> TrainConfig:
        return self.cfg(self.prof.ft_epochs, self.prof.ft_lr, distill=self.prof.distill)

    def passes(self, epochs: int) -> int:
        """Adversarial forward/backward passes per run of ``epochs``: attack steps + the training step, per image."""
        return epochs * len(self.train) * (self.prof.train_steps + 1)

    def train_teacher(self) -> None:
        finetune(self.teacher, self.train, self.cfg(self.prof.teacher_epochs, self.prof.teacher_lr),
                 run_dir=self.dir / "teacher", resume=True)
        self.teacher.eval()

    # -- the methods: each returns (compressed model, compute record) --------------------------------------
    def transform_ft(self, ratio: float, distill: bool = False, calibrate: int = 0, sensitivity: int = 0,
                     **plan_options: Any) -> tuple[nn.Module, dict]:
        cfg = self.ft_distill if distill else self.ft
        gm = decompose_finetune(self.teacher, self.train, ratio, cfg, run_dir=self._cell(self._ratio) / "run",
                                resume=True, calibrate=calibrate, sensitivity=sensitivity, round_to=1, **plan_options)
        # calibration: one attack per image; sensitivity: an attack and one more forward/backward per image;
        # both once per factorization (twice with gradual rank reduction)
        factorizations = 2 if plan_options.get("gradual_epochs") else 1
        passes = factorizations * (calibrate * (self.prof.train_steps + 1) + sensitivity * (self.prof.train_steps + 2))
        return gm, self._compute(self.prof.ft_epochs, distill, calib_passes=passes)

    def sens_distill(self, ratio: float) -> tuple[nn.Module, dict]:
        return self.transform_ft(ratio, distill=True, calibrate=self.prof.calibrate, sensitivity=self.prof.calibrate)

    def transform_spatial(self, ratio: float) -> tuple[nn.Module, dict]:
        return self.transform_ft(ratio, conv_scheme="spatial_svd")

    def transform_distill(self, ratio: float) -> tuple[nn.Module, dict]:
        return self.transform_ft(ratio, distill=True)

    def data_ft(self, ratio: float) -> tuple[nn.Module, dict]:
        return self.transform_ft(ratio, calibrate=self.prof.calibrate)

    def data_distill(self, ratio: float) -> tuple[nn.Module, dict]:
        return self.transform_ft(ratio, distill=True, calibrate=self.prof.calibrate)

    def flops_ft(self, ratio: float, calibrate: int = 0) -> tuple[nn.Module, dict]:
        """A FLOP-budget plan at the same parameter count as the others (its FLOP ratio bisected to hit ``ratio``)."""
        flops = flops_ratio_at_params(self.teacher, ratio, self.example)
        return self.transform_ft(flops, calibrate=calibrate, budget="flops", example_inputs=self.example)

    def flops_data(self, ratio: float) -> tuple[nn.Module, dict]:
        return self.flops_ft(ratio, calibrate=self.prof.calibrate)

    def both_data(self, ratio: float) -> tuple[nn.Module, dict]:
        """At least ``ratio`` fewer FLOPs *and* parameters (``budget="both"``), data-aware: the library's recipe."""
        return self.transform_ft(ratio, calibrate=self.prof.calibrate, budget="both", example_inputs=self.example)

    def sens_both(self, ratio: float) -> tuple[nn.Module, dict]:
        """``both_data`` with the ranks weighted by each layer's measured adversarial-loss sensitivity."""
        return self.transform_ft(ratio, calibrate=self.prof.calibrate, sensitivity=self.prof.calibrate, budget="both",
                                 example_inputs=self.example)

    def gradual_both(self, ratio: float) -> tuple[nn.Module, dict]:
        """``both_data`` reached in two steps: an epoch at ``sqrt(ratio)``, then re-truncated to ``ratio``."""
        return self.transform_ft(ratio, calibrate=self.prof.calibrate, budget="both", example_inputs=self.example,
                                 gradual_epochs=min(1, self.prof.ft_epochs - 1))

    def _pruned_first(self, ratio: float) -> tuple[nn.Module, dict]:
        """Channel pruning for ``ratio ** share``, then data-aware low rank for the rest (``PRUNED_FIRST``)."""
        staged = PRUNED_FIRST[self._method]
        options = {"example_inputs": self.example} if staged.budget != "params" else {}
        return self.transform_ft(ratio, distill=staged.distill, calibrate=self.prof.calibrate, prune=staged.share,
                                 budget=staged.budget, prune_epochs=min(staged.epochs, self.prof.ft_epochs - 1),
                                 sensitivity=self.prof.calibrate if staged.sensitivity else 0, **options)

    hybrid_ft = hybrid_both = hybrid25_both = hybrid75_both = hybrid_staged = sens_staged = _pruned_first
    staged_distill = _pruned_first

    def prune_ft(self, ratio: float, distill: bool = False, budget: str = "params") -> tuple[nn.Module, dict]:
        pruned = self._pruned(ratio, budget)
        recalibrate_bn(pruned, self.train, batch_size=self.prof.batch_size, seed=self.seed)
        finetune(pruned, self.train, self.ft_distill if distill else self.ft, run_dir=self._cell(ratio) / "run",
                 resume=True, teacher=self.teacher if distill else None)
        return pruned, self._compute(self.prof.ft_epochs, distill)

    def prune_distill(self, ratio: float) -> tuple[nn.Module, dict]:
        return self.prune_ft(ratio, distill=True)

    def prune_both(self, ratio: float) -> tuple[nn.Module, dict]:
        """The mildest pruning at least ``ratio`` times smaller in FLOPs and in parameters (as the recipe)."""
        return self.prune_ft(ratio, budget="both")

    def _pruned(self, ratio: float, budget: str) -> nn.Module:
        from cstar_fx.passes.prune import prune_to_ratio

        # "both": single channels of the full-resolution stream move the FLOPs by several percent, so the
        # nearest pruning can miss 3%; the mildest one reaching the ratio keeps the recipe's promise (>= r)
        options = {"at_least": True, "tolerance": 0.15} if budget == "both" else {}
        return prune_to_ratio(self.teacher, ratio, self.example, importance="l2", round_to=1, budget=budget,
                              **options)

    def uniform_ft(self, ratio: float) -> tuple[nn.Module, dict]:
        plan = uniform_plan(self.teacher, ratio)
        gm = cstar_fx.transform(self.teacher, plan=plan)
        recalibrate_bn(gm, self.train, batch_size=self.prof.batch_size, seed=self.seed)
        finetune(gm, self.train, self.ft, run_dir=self._cell(ratio) / "run", resume=True)
        return gm, self._compute(self.prof.ft_epochs, False)

    def cstar(self, ratio: float, replan: bool = False) -> tuple[nn.Module, dict]:
        j, f = self.prof.joint_epochs, self.prof.ft_epochs - self.prof.joint_epochs
        steps = len(self.train) // self.prof.batch_size
        # rho so that lr * rho / (1 - momentum), the fraction of the gap to Z closed per step, closes it about
        # once per refresh (4 per epoch): a gentle pull at the fine-tune's learning rate, not a hard projection.
        refresh = max(1, steps // 4)
        rho = 1.0 / (refresh * self.prof.ft_lr / (1 - 0.9))
        cfg = JointConfig(joint=self.cfg(j, self.prof.ft_lr, schedule="constant"), finetune=self.cfg(f, self.prof.ft_lr),
                          admm=AdmmConfig(rho=rho, rho_growth=1.0, rho_max=rho, refresh_every=refresh, replan=replan,
                                          projection="euclidean" if replan else "plan"))
        gm = cstar(self.teacher, self.train, ratio, cfg, run_dir=self._cell(ratio) / "run", resume=True, round_to=1)
        out = {**self._compute(f, False), "dense passes": self.passes(j), "rho": rho}
        if replan:
            out["rank moves"] = sum(r["rank_moves"] for r in gm.meta["cstar_training"]["admm"])
        return gm, out

    def cstar_euclid(self, ratio: float) -> tuple[nn.Module, dict]:
        return self.cstar(ratio, replan=True)

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def _cell(self, ratio: float, method: str | None = None) -> Path:
        return self.cells / f"{method or self._method}_{ratio:g}x"

    def _compute(self, epochs: int, distill: bool, calib_passes: int = 0) -> dict[str, Any]:
        return {"epochs": self.prof.ft_epochs, "student passes": self.passes(epochs),
                "teacher forwards": epochs * len(self.train) if distill else 0, "calibration passes": calib_passes}

    def evaluate(self, model: nn.Module, aa: bool) -> dict[str, Any]:
        if aa:  # AutoAttack (or its APGD part) on its subset only
            key = self.prof.aa_attack
            res = evaluate(model, aa_subset(self.test, self.args.aa_n), attacks=(key,), sanity=False, seed=self.seed,
                           progress=False)
            return {key: 100 * res.robust[key]}
        res = evaluate(model, self.test, attack=PGD20,
                       n=self.prof.pgd_n, sanity_n=self.prof.sanity_n, seed=self.seed, progress=False)
        out = {"clean": 100 * res.clean, "pgd20": 100 * res.pgd, "sanity": res.sanity.ok,
               "sanity_failed": list(res.sanity.failed), "eval s": res.seconds}
        return out

    def run_cell(self, method: str, ratio: float) -> dict[str, Any]:
        cell = self._cell(ratio, method)
        done = cell / "result.json"
        if done.is_file():
            return json.loads(done.read_text())
        self._method, self._ratio = method, ratio  # the cell's; a method may plan at another ratio
        _log(f"seed {self.seed} {ratio:g}x {method}: compressing and training")
        t0 = time.perf_counter()
        model, compute = getattr(self, method)(ratio)
        train_s = time.perf_counter() - t0
        params = sum(p.numel() for p in model.parameters())
        row = {"seed": self.seed, "method": method, "ratio": ratio, "params": params,
               "ratio params": self.dense_params / params,
               "ratio FLOPs": self.dense_flops / cstar_fx.count_flops(model, self.example),
               **compute, "train s": train_s, **self.evaluate(model, False)}
        cell.mkdir(parents=True, exist_ok=True)
        if isinstance(model, torch.fx.GraphModule):  # the architecture, for rebuilding the model from its checkpoint
            atomic_write_text(cell / "plan.json", cstar_fx.get_plan(model).to_json())
        atomic_write_text(done, json.dumps(row, indent=2))
        return row

    def rebuild(self, method: str, ratio: float) -> nn.Module:
        """A finished cell's architecture (weights not loaded): its plan.json over the teacher, or the pruning."""
        from cstar_fx.passes.prune import prune_to_ratio

        plan = self._cell(ratio, method) / "plan.json"
        base = self.teacher
        if method in PRUNED_FIRST:
            staged = PRUNED_FIRST[method]
            base = prune_to_ratio(self.teacher, ratio ** staged.share, self.example, importance="l2", round_to=1,
                                  budget=staged.budget, tolerance=0.25)  # as decompose_finetune's prune step
        elif not plan.is_file():
            return self._pruned(ratio, "both" if method == "prune_both" else "params")
        return cstar_fx.transform(base, plan=cstar_fx.RankPlan.from_json(plan.read_text()), decompose=False)

    def add_evaluations(self, method: str, ratio: float, splits: dict[str, Any]) -> dict[str, Any] | None:
        """The later evaluations of a finished cell's model, stored in its result: AutoAttack (or APGD) with
        ``--autoattack`` for ``AA_METHODS``, clean and PGD-20 on each of ``splits`` (name -> images; result keys
        ``clean <name>`` / ``pgd20 <name>``). The model is rebuilt from its checkpoint once, only if a result is
        missing; ``None`` when the cell is missing."""
        from cstar_fx.robust import load_checkpoint

        cell = self._cell(ratio, method)
        done = cell / "result.json"
        if not done.is_file():
            return None
        row = json.loads(done.read_text())
        aa = bool(self.args.autoattack and self.args.aa_n) and method in AA_METHODS and self.prof.aa_attack not in row
        aa_key = f"{self.prof.aa_attack} {self.args.aa_split}"
        on_split = bool(self.args.aa_split and self.args.aa_n) and method in AA_METHODS
        # PGD-20 on the very images the stronger attack saw: the two attacks' verdicts then differ by attack only
        split_attacks = [a for a, key in (("pgd", f"pgd20 {aa_key}"), (self.prof.aa_attack, aa_key))
                         if on_split and key not in row]
        todo = {name: data for name, data in splits.items() if f"pgd20 {name}" not in row}
        if not (aa or split_attacks or todo):
            return row
        model = self.rebuild(method, ratio)
        ckpt = load_checkpoint(cell / "run" / "finetune") or load_checkpoint(cell / "run")
        model.load_state_dict(ckpt["model"])
        clean = 100 * evaluate(model, self.test, attacks=(), n=self.prof.pgd_n, sanity=False, progress=False).clean
        if abs(clean - row["clean"]) > 1e-6:
            raise RuntimeError(f"{cell}: the rebuilt model's clean accuracy {clean:.2f} differs from the recorded "
                               f"{row['clean']:.2f}; the checkpoint does not belong to this cell")
        if aa:
            row.update(self.evaluate(model, True))
        if split_attacks:
            data = first_per_class(splits[self.args.aa_split], self.args.aa_n // 10)
            res = evaluate(model, data, attacks=split_attacks, attack=PGD20, sanity=False, seed=self.seed,
                           progress=False)
            row[f"{aa_key} n"] = len(data)
            if "pgd" in split_attacks:
                row[f"pgd20 {aa_key}"] = 100 * res.pgd
            if self.prof.aa_attack in split_attacks:
                row[aa_key] = 100 * res.robust[self.prof.aa_attack]
        for name, data in todo.items():
            row.update(self.evaluate_split(model, name, data))
        atomic_write_text(done, json.dumps(row, indent=2))
        return row

    def teacher_splits(self, splits: dict[str, Any]) -> dict[str, Any]:
        """The teacher's row with its clean and PGD-20 accuracy on each of ``splits`` (measured once, then stored)."""
        done = self.dir / "teacher" / "result.json"
        row = json.loads(done.read_text())
        todo = {name: data for name, data in splits.items() if f"pgd20 {name}" not in row}
        for name, data in todo.items():
            row.update(self.evaluate_split(self.teacher, name, data))
        if todo:
            atomic_write_text(done, json.dumps(row, indent=2))
        return row

    def evaluate_split(self, model: nn.Module, name: str, data: Any) -> dict[str, Any]:
        blocks = class_blocks(data, SPLITS[name].blocks)
        res = [evaluate(model, block, attack=PGD20, sanity=False, seed=self.seed, progress=False) for block in blocks]
        clean, pgd = [100 * r.clean for r in res], [100 * r.pgd for r in res]
        row = {f"clean {name}": statistics.mean(clean), f"pgd20 {name}": statistics.mean(pgd), f"{name} n": len(data)}
        if len(blocks) > 1:
            row.update({f"clean {name} blocks": clean, f"pgd20 {name} blocks": pgd})
        return row

    def teacher_row(self) -> dict[str, Any]:
        done = self.dir / "teacher" / "result.json"
        if done.is_file():
            row = json.loads(done.read_text())
        else:
            _log(f"seed {self.seed} teacher: training ({self.prof.teacher_epochs} epochs)")
            t0 = time.perf_counter()
            self.train_teacher()
            row = {"seed": self.seed, "method": "teacher", "ratio": 1.0, "params": self.dense_params,
                   "ratio params": 1.0, "ratio FLOPs": 1.0, "epochs": self.prof.teacher_epochs,
                   "student passes": self.passes(self.prof.teacher_epochs), "train s": time.perf_counter() - t0,
                   **self.evaluate(self.teacher, False)}
            atomic_write_text(done, json.dumps(row, indent=2))
        self.train_teacher()  # loads the finished checkpoint (no training) when the row was cached
        return row

    @property
    def dense_params(self) -> int:
        return sum(p.numel() for p in self.teacher.parameters())

    @property
    def dense_flops(self) -> float:
        return cstar_fx.count_flops(self.teacher, self.example)


def finished_rows(bench: Bench) -> list[dict[str, Any]]:
    """The teacher's row of ``bench``'s seed and the rows of its finished cells, read from their result files."""
    files = [bench.dir / "teacher" / "result.json", *sorted(bench.cells.glob("*x/result.json"))]
    return [json.loads(f.read_text()) for f in files]


def split_images(args: argparse.Namespace, prof: Profile, train: Any, test: Any, name: str) -> Any:
    """The profile's images of split ``name`` (one of ``SPLITS``), per class: the held-out images are the
    ``heldout_per_class`` test images after the first ``test_per_class`` (the table's own test images), so no choice
    made on the table has seen them; the confirmation images are the ``confirm_per_class`` after those; the unseen
    training images the ``unseen_per_class`` after the first ``train_per_class``, which every model trains on, and the
    fresh ones the ``fresh_per_class`` after those."""
    split = SPLITS[name]
    first = {"train": prof.train_per_class, "test": prof.test_per_class}[split.source]
    size = getattr(prof, f"{name}_per_class")
    if not size or first is None:
        raise SystemExit(f"--{name}: the {args.profile} profile has no {split.label} images")
    earlier = list(SPLITS)[:list(SPLITS).index(name)]
    skip = sum(getattr(prof, f"{s}_per_class") for s in earlier if SPLITS[s].source == split.source)
    counts = {"train": prof.train_per_class, "test": prof.test_per_class, split.source: first + skip + size}
    wide = dict(zip(("train", "test"), cifar10_jpeg(args.archive, cache_dir=args.cache_dir, augment=False,
                                                    per_class=(counts["train"], counts["test"]))))
    return images_after(wide[split.source], {"train": train, "test": test}[split.source], first, skip)


def images_after(wide: Any, own: Any, first: int, skip: int = 0) -> Any:
    """The images of ``wide`` after the first ``first + skip`` of each class (in ``wide``'s order); the first
    ``first`` must be ``own``, the table's own images of that split (its training or test images), or the images
    returned could overlap them."""
    rank = class_rank(wide.y)
    if not torch.equal(wide.x[rank < first].to(own.x.device), own.x):
        raise RuntimeError("the first images per class of the wider split are not the table's own images, so the "
                           "images after them could overlap them")
    return wide.subset((rank >= first + skip).nonzero().flatten())


def class_rank(y: torch.Tensor) -> torch.Tensor:
    """Each label's position among the labels of its class, in order."""
    rank = torch.zeros_like(y)
    for c in y.unique():
        where = (y == c).nonzero().flatten()
        rank[where] = torch.arange(len(where), device=where.device)
    return rank


def first_per_class(data: Any, n: int) -> Any:
    """The first ``n`` images of each class of ``data`` (by position within the class)."""
    if n < 1:
        raise ValueError(f"need at least one image per class, got {n}")
    return data.subset((class_rank(data.y) < n).nonzero().flatten())


def class_blocks(data: Any, k: int) -> list[Any]:
    """``data`` cut into ``k`` blocks holding the same number of images of every class (by position within the
    class), so that the mean of the blocks' accuracies is the accuracy on all of ``data``."""
    if k == 1:
        return [data]
    counts = torch.bincount(data.y)
    if len(set(counts.tolist())) != 1 or counts[0] % k:
        raise ValueError(f"{k} blocks need the same number of images in every class, divisible by {k}; "
                         f"got {counts.tolist()}")
    part = class_rank(data.y) // (int(counts[0]) // k)
    return [data.subset((part == b).nonzero().flatten()) for b in range(k)]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def aa_subset(test: Any, n: int) -> Any:
    """``n`` test images spread evenly over the set (every k-th): the CPU profile's test set is sorted by class."""
    step = max(1, len(test) // n)
    return test.subset(torch.arange(0, len(test), step)[:n])


def flops_ratio_at_params(model: nn.Module, ratio: float, example: torch.Tensor) -> float:
    """The FLOP ratio whose ``budget="flops"`` plan is ``ratio`` times smaller in parameters (bisection in log space)."""
    lo, hi = 1.0, ratio
    while cstar_fx.plan_ranks(model, hi, budget="flops", example_inputs=example, round_to=1).ratio_params < ratio:
        lo, hi = hi, hi * 2
    for _ in range(30):
        mid = (lo * hi) ** 0.5
        got = cstar_fx.plan_ranks(model, mid, budget="flops", example_inputs=example, round_to=1).ratio_params
        lo, hi = (mid, hi) if got < ratio else (lo, mid)
    return hi


def uniform_plan(model: nn.Module, ratio: float) -> cstar_fx.RankPlan:
    """Every factorized layer keeps the same fraction of its full ranks, the fraction bisected to reach ``ratio``."""
    full = cstar_fx.RankPlan.full_rank(model)
    dense = sum(p.numel() for p in model.parameters())

    def at(frac: float) -> cstar_fx.RankPlan:
        plan = full
        for name, lp in full.factorized.items():
            plan = plan.with_layer(name, ranks=tuple(max(1, round(frac * r)) for r in lp.ranks))
        return plan

    def achieved(frac: float) -> float:
        gm = cstar_fx.transform(model, plan=at(frac), decompose=False)
        return dense / sum(p.numel() for p in gm.parameters())

    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if achieved(mid) >= ratio else (lo, mid)
    return at(lo)


def _mean_std(values: list[float], of: int | None = None) -> str:
    """``mean ± std``; ``of``: the row's seed count, named beside the value when fewer seeds have this result."""
    if not values:
        return "-"
    mean = statistics.mean(values)
    text = f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ± {statistics.stdev(values):.2f}"
    return text + (f" ({len(values)} seeds)" if of is not None and len(values) < of else "")


def summarise(rows: list[dict[str, Any]], ratios: tuple[float, ...], methods: list[str], *,
              reference: str = RECOMMENDED, aa_key: str = "autoattack") -> tuple[list, list]:
    """Mean +- std per (ratio, method) and per-seed paired differences of ``reference`` minus each method;
    ``aa_key`` is the AutoAttack-stage result (``"autoattack"`` or ``"apgd"``)."""
    aa_col = AA_LABELS[aa_key]
    table, paired = [], []
    teachers = [r for r in rows if r["method"] == "teacher"]
    if teachers:
        table.append(_agg("teacher", 1.0, teachers, aa_key))
    for ratio in ratios:
        for method in methods:
            cells = [r for r in rows if r["method"] == method and r["ratio"] == ratio]
            if cells:
                table.append(_agg(method, ratio, cells, aa_key))
        rec = {r["seed"]: r for r in rows if r["method"] == reference and r["ratio"] == ratio}
        for method in methods:
            if method == reference:
                continue
            other = {r["seed"]: r for r in rows if r["method"] == method and r["ratio"] == ratio}
            seeds = sorted(set(rec) & set(other))
            if not seeds:
                continue
            row = {"ratio": f"{ratio:g}x", "vs": LABELS[method], "seeds": len(seeds)}
            keys = [("pgd20", "Δ PGD-20"), ("clean", "Δ clean"), (aa_key, f"Δ {aa_col}")]
            for split, (label, *_) in SPLITS.items():
                keys += [(f"pgd20 {split}", f"Δ PGD-20 {label}"), (f"clean {split}", f"Δ clean {label}"),
                         (f"{aa_key} {split}", f"Δ {aa_col} {label}")]
                if any(f"pgd20 {aa_key} {split}" in r for r in rows):
                    keys.append((f"pgd20 {aa_key} {split}", f"Δ PGD-20 {label}, the {aa_col} images"))
            for key, col in keys:
                diffs = [rec[s][key] - other[s][key] for s in seeds if key in rec[s] and key in other[s]]
                row[col] = _mean_std(diffs, of=len(seeds))
                if key.startswith("pgd20") and len(diffs) > 1:
                    sd = statistics.stdev(diffs)
                    row[f"{col[2:]} gain > 2 sd"] = "yes" if statistics.mean(diffs) > 2 * sd else "no"
            for split, (label, _, blocks) in SPLITS.items():
                if blocks == 1:
                    continue
                noise = evaluation_sd([rec[s] for s in seeds], [other[s] for s in seeds], f"pgd20 {split} blocks")
                if noise is not None:
                    per_seed, mean = noise
                    row[f"Δ PGD-20 {label} evaluation sd"] = (f"{per_seed:.2f} per seed ({per_seed * math.sqrt(blocks):.2f} "
                                                              f"on a block), {mean:.2f} of the mean")
            paired.append(row)
    return table, paired


def evaluation_sd(rec: list[dict[str, Any]], other: list[dict[str, Any]], key: str) -> tuple[float, float] | None:
    """The evaluation noise in the paired differences ``rec - other`` of the block-scored result ``key`` (one row
    per seed, in the same order): ``(per seed, of the mean)``. Per seed: the spread of one seed's difference over
    the blocks / sqrt(blocks), averaged (as a variance) over the seeds, which the seed-to-seed sd contains. Of
    the mean: the spread over the blocks of the difference averaged over the seeds / sqrt(blocks), which also
    holds what the seeds share by being scored on the same images, so the seed-to-seed sd cannot show it.
    ``None`` unless every row has the blocks."""
    if not rec or any(key not in r for r in rec + other):
        return None
    diffs = [[x - y for x, y in zip(a[key], b[key])] for a, b in zip(rec, other)]
    blocks = len(diffs[0])
    per_seed = math.sqrt(statistics.mean(statistics.variance(d) / blocks for d in diffs))
    mean = math.sqrt(statistics.variance([statistics.mean(col) for col in zip(*diffs)]) / blocks)
    return per_seed, mean


def _agg(method: str, ratio: float, cells: list[dict[str, Any]], aa_key: str) -> dict[str, Any]:
    first = cells[0]
    return {"method": LABELS[method], "ratio": f"{ratio:g}x" if ratio > 1 else "-", "seeds": len(cells),
            "ratio params": f"{statistics.mean(c['ratio params'] for c in cells):.1f}",
            "ratio FLOPs": f"{statistics.mean(c['ratio FLOPs'] for c in cells):.1f}",
            "student passes": first.get("student passes", ""), "dense passes": first.get("dense passes", 0),
            "teacher fwd": first.get("teacher forwards", 0), "calib passes": first.get("calibration passes", 0),
            "clean %": _mean_std([c["clean"] for c in cells]), "PGD-20 %": _mean_std([c["pgd20"] for c in cells]),
            f"{AA_LABELS[aa_key]} %": _mean_std([c[aa_key] for c in cells if aa_key in c], of=len(cells)),
            **{f"{m} % {label}": _mean_std([c[f"{key} {split}"] for c in cells if f"{key} {split}" in c], of=len(cells))
               for split, (label, *_) in SPLITS.items()
               for key, m in (("clean", "clean"), ("pgd20", "PGD-20"), (aa_key, AA_LABELS[aa_key]))},
            **{f"PGD-20 % {label}, the {AA_LABELS[aa_key]} images":
               _mean_std([c[f"pgd20 {aa_key} {split}"] for c in cells if f"pgd20 {aa_key} {split}" in c], of=len(cells))
               for split, (label, *_) in SPLITS.items()},
            "sanity": "ok" if all(c["sanity"] for c in cells) else "FAILED",
            "train s": f"{statistics.mean(c['train s'] for c in cells):.0f}"}


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the benchmark and write the table; returns 0."""
    args = _args(argv)
    prof = PROFILES[args.profile]
    if args.ft_epochs is not None:
        prof = dataclasses.replace(prof, ft_epochs=args.ft_epochs)
    if args.teacher_epochs is not None:
        prof = dataclasses.replace(prof, teacher_epochs=args.teacher_epochs)
    aa_col = AA_LABELS[prof.aa_attack]
    if args.aa_n is None:
        args.aa_n = prof.aa_n
    torch.set_num_threads(args.threads)
    lib = logging.getLogger("cstar_fx")
    if not sys.stderr.isatty() and not any(h.get_name() == "robust_table" for h in lib.handlers):
        handler = logging.StreamHandler(sys.stderr)  # a log file: the library's line per epoch instead of tqdm bars
        handler.set_name("robust_table")
        handler.setFormatter(logging.Formatter("[%(asctime)s]   %(message)s", "%H:%M:%S"))
        lib.addHandler(handler)
        lib.setLevel(logging.INFO)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.aa_n:
        try:
            import pyautoattack  # noqa: F401
        except ImportError:
            _log("AutoAttack skipped: pip install 'cstar-fx[robust]' to add it")
            args.aa_n = 0
    t_all = time.perf_counter()
    train, test = cifar10_jpeg(args.archive, cache_dir=args.cache_dir, per_class=(prof.train_per_class,
                                                                                  prof.test_per_class))
    if device.type == "cuda":
        train, test = train.to(device), test.to(device)
    _log(f"data: CIFAR-10 (JPEG q75), {len(train)} train / {len(test)} test; device {device}; profile {args.profile}")
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        bench = Bench(args, prof, seed, train, test, device)
        if args.report:
            rows += finished_rows(bench)
            continue
        row = bench.teacher_row()
        rows.append(row)
        _log(f"seed {seed} teacher: clean {row['clean']:.2f} PGD-20 {row['pgd20']:.2f}")
    if (args.autoattack or args.splits) and not args.report:
        splits = {name: split_images(args, prof, train, test, name) for name in args.splits}
        for name, data in splits.items():
            _log(f"{SPLITS[name].label}: {len(data)} {SPLITS[name].source} images ({len(data) // 10} per class)")
        if splits:
            for seed in args.seeds:
                bench = Bench(args, prof, seed, train, test, device)
                bench.train_teacher()
                row = bench.teacher_splits(splits)
                _log(f"seed {seed} teacher " + "; ".join(
                    f"{SPLITS[n].label}: clean {row[f'clean {n}']:.2f} PGD-20 {row[f'pgd20 {n}']:.2f}" for n in splits))
        for ratio in args.ratios:
            for seed in args.seeds:
                bench = Bench(args, prof, seed, train, test, device)
                bench.train_teacher()
                for method in args.methods:
                    t0 = time.perf_counter()
                    row = bench.add_evaluations(method, ratio, splits)
                    if row is None:
                        continue
                    found = []
                    if args.autoattack and method in AA_METHODS:
                        found.append(f"{aa_col} {_pct(row.get(prof.aa_attack))}")
                    if args.aa_split and method in AA_METHODS:
                        key = f"{prof.aa_attack} {args.aa_split}"
                        found.append(f"{aa_col} {SPLITS[args.aa_split].label} {_pct(row.get(key))} "
                                     f"(PGD-20 on its images {_pct(row.get(f'pgd20 {key}'))})")
                    found += [f"{SPLITS[n].label}: clean {row[f'clean {n}']:.2f} PGD-20 {row[f'pgd20 {n}']:.2f}"
                              for n in splits]
                    if found:
                        _log(f"seed {seed} {ratio:g}x {method:<18} {'; '.join(found)} ({time.perf_counter() - t0:.0f} s)")
        args.report = True
        rows = [row for seed in args.seeds for row in finished_rows(Bench(args, prof, seed, train, test, device))]
    if not args.report:
        for ratio in args.ratios:  # ratio-major: a partial run still has every seed of the first ratio
            for seed in args.seeds:
                bench = Bench(args, prof, seed, train, test, device)
                bench.train_teacher()
                for method in args.methods:
                    t0 = time.perf_counter()
                    row = bench.run_cell(method, ratio)
                    rows.append(row)
                    _log(f"seed {seed} {ratio:g}x {method:<18} clean {row['clean']:.2f} PGD-20 {row['pgd20']:.2f} "
                         f"({time.perf_counter() - t0:.0f} s)")
    table, paired = summarise(rows, args.ratios, args.methods, reference=args.reference, aa_key=prof.aa_attack)
    handoff = " (hand-off: the compressed models before their fine-tune; the labels' '+ FT' is not run)"
    meta = {"profile": args.profile + (handoff if args.handoff else ""),
            "dataset": f"CIFAR-10 (JPEG q75), {len(train)} train, first {prof.pgd_n} test images ({aa_col}: "
                       f"{args.aa_n} of them, spread over all classes)",
            "model": f"CIFAR ResNet-18, width {prof.width} ({bench.dense_params:,} params)",
            "threat model": "L_inf eps 8/255; PGD-20 step 2/255 (1 restart); " + (
                "AutoAttack standard" if prof.aa_attack == "autoattack" else
                "APGD-CE + APGD-T (9 targets) of standard AutoAttack, FAB-T and Square not run"),
            "training": f"PGD-{prof.train_steps} AT (step {prof.train_alpha * 255:.0f}/255), SGD 0.9, wd 5e-4, batch "
                        f"{prof.batch_size}, cosine; teacher {prof.teacher_epochs} ep lr {prof.teacher_lr}; every "
                        f"method {prof.ft_epochs} adversarial epochs at lr {prof.ft_lr} (CSTAR: {prof.joint_epochs} "
                        f"joint + {prof.ft_epochs - prof.joint_epochs} FT); BN re-estimated after compression; "
                        f"distill weight {prof.distill}; calibration {prof.calibrate} images + their PGD examples",
            "seeds": list(args.seeds), "device": str(device), "wall s": round(time.perf_counter() - t_all, 1)}
    name = f"robust_table_{args.profile}{args.teachers}" + (f"_{args.variant}" if args.variant else "")
    columns = ["method", "ratio", "seeds", "ratio params", "ratio FLOPs", "student passes", "dense passes",
               "teacher fwd", "calib passes", "clean %", "PGD-20 %", f"{aa_col} %", "sanity", "train s"]
    pcols = ["ratio", "vs", "seeds", "Δ PGD-20", "PGD-20 gain > 2 sd", "Δ clean", f"Δ {aa_col}"]
    about = {"heldout": f"{prof.heldout_per_class} test images per class after the first {prof.test_per_class}",
             "confirm": f"{prof.confirm_per_class} test images per class after the held-out ones",
             "unseen": f"{prof.unseen_per_class} training images per class after the first {prof.train_per_class} "
                       "(never trained on)",
             "fresh": f"{prof.fresh_per_class} training images per class after the unseen ones (never trained on)",
             "reserve": f"{prof.reserve_per_class} training images per class after the fresh ones (never trained on), "
                        f"scored in {SPLITS['reserve'].blocks} class-balanced blocks"}
    for split, (label, *_) in SPLITS.items():
        if any(f"pgd20 {split}" in r for r in rows):
            columns[-2:-2] = [f"clean % {label}", f"PGD-20 % {label}"]
            pcols += [f"Δ PGD-20 {label}", f"PGD-20 {label} gain > 2 sd", f"Δ clean {label}"]
            if any(f"pgd20 {split} blocks" in r for r in rows):
                pcols.append(f"Δ PGD-20 {label} evaluation sd")
            meta[label] = about[split] + ", PGD-20 as above, no sanity checks"
        if any(f"{prof.aa_attack} {split}" in r for r in rows):
            columns[-2:-2] = [f"{aa_col} % {label}"]
            pcols.append(f"Δ {aa_col} {label}")
            n = next(r[f"{prof.aa_attack} {split} n"] for r in rows if f"{prof.aa_attack} {split} n" in r)
            meta[f"{aa_col} {label}"] = f"the first {n // 10} of each class of the {label} images"
        if any(f"pgd20 {prof.aa_attack} {split}" in r for r in rows):
            columns[-2:-2] = [f"PGD-20 % {label}, the {aa_col} images"]
            pcols.append(f"Δ PGD-20 {label}, the {aa_col} images")
    md = write(name, table, columns, meta)
    paired_md = markdown_table(paired, pcols)
    with open(OUT / f"{name}.md", "a") as fh:
        fh.write(f"\nPaired per-seed differences, {LABELS[args.reference]} minus each method (mean ± std over seeds):\n\n"
                 f"{paired_md}\n")
    data = json.loads((OUT / f"{name}.json").read_text())
    data["cells"], data["paired"] = rows, paired
    atomic_write_text(OUT / f"{name}.json", json.dumps(data, indent=2))
    print(md + "\n" + paired_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
