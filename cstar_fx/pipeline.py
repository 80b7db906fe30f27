"""The compression pipeline as a library: model -> robust teacher -> compress per method and ratio -> evaluate
-> ONNX export (and int8) -> onnxruntime benchmark, with a typed result.

``cstar-fx compress`` is this module behind a command line and a run folder: the command parses its
options into a :class:`PipelineConfig`, builds a :class:`Pipeline` (which checks that every method reaches
every ratio before anything is trained) and writes what :meth:`Pipeline.run` returns.

Under ``torchrun`` every rank runs the stages (training and evaluation are distributed); only rank 0
writes into the workspace, exports and benchmarks.

Example:
    >>> from cstar_fx.pipeline import Pipeline, PipelineConfig, load_data, model_for
    >>> train, test = load_data("digits", limit=96)
    >>> cfg = PipelineConfig(ratios=(4,), methods=("decompose",), teacher_epochs=1, finetune_epochs=1, eps=0.1,
    ...                      eval_n=24, export=False)
    >>> result = Pipeline(model_for("small_cnn", train), train, test, cfg).run()  # doctest: +SKIP
    >>> result.runs[0].ratio_params, result.runs[0].clean  # doctest: +SKIP
    (4.0..., 0.8...)
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn

from . import robust
from .allocate import UnreachableBudgetError
from .api import count_flops, get_plan, plan_ranks
from .errors import CstarValueError, MissingExtraError
from .export import CPU, CUDA, BenchResult, benchmark, evaluate_onnx, pgd_examples, quantize_int8, to_onnx
from .fileutil import atomic_path
from .io import load_weights
from .models import TORCHVISION_NAMES, build_model, small_cnn
from .passes.prune import PRUNE_BUDGETS
from .robust.cstar import model_on
from .robust.config import (RECOMMENDED, AdmmConfig, AttackConfig, JointConfig, LossConfig, Recipe, TrainConfig,
                            check_prune_epochs, check_prune_share)
from .robust.distributed import is_main_process
from .runreport import RESULTS_FORMAT
from .sysinfo import describe

__all__ = ["Pipeline", "PipelineConfig", "PipelineResult", "DenseResult", "MethodResult", "Int8Result",
           "Latency", "Workspace", "Directory", "load_data", "model_for", "default_eps", "run_label", "METHODS",
           "DATASETS", "NEEDS_ROOT", "MODELS"]

METHODS = ("cstar", "decompose", "prune")
"""cstar: ADMM joint training + fine-tune; decompose: transform + fine-tune; prune: Torch-Pruning + fine-tune."""
DATASETS = ("digits", "cifar10", "cifar10-jpeg", "folder")
NEEDS_ROOT = ("cifar10", "folder")
"""The datasets with no default location (cifar10-jpeg's archive defaults to ``$CSTAR_FX_CIFAR10_JPEG`` or
``../shared/data/cifar10-jpeg.tar.xz``; digits is built in)."""
MODELS = ("small_cnn", *TORCHVISION_NAMES)


def default_eps(dataset: str) -> float:
    """The L_inf attack radius a dataset is evaluated at by default: 0.1 on 8x8 digits, 8/255 otherwise.

    Example:
        >>> default_eps("digits"), round(default_eps("cifar10"), 4)
        (0.1, 0.0314)
    """
    return 0.1 if dataset == "digits" else 8 / 255


def load_data(dataset: str, root: str | Path | None = None, *, limit: int | None = None, seed: int = 0) -> tuple[Any, Any]:
    """The ``(train, test)`` TensorData of a dataset in :data:`DATASETS`; ``limit`` keeps the first ``limit``
    training and ``limit // 4`` (at least 8) test images.

    ``root``: cifar10: the torchvision root; cifar10-jpeg: the ``.tar.xz`` archive (default: see
    :func:`cstar_fx.data.cifar10_jpeg`); folder: a root with ``train/`` and ``test/`` ImageFolder trees (the
    training split gets crop-and-flip augmentation).
    A missing or unreadable dataset raises ``FileNotFoundError``, ``RuntimeError`` or ``ValueError``.

    Example:
        >>> train, test = load_data("digits", limit=64)
        >>> len(train), len(test)
        (64, 16)
    """
    from . import data as D

    if dataset not in DATASETS:
        raise CstarValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if dataset in NEEDS_ROOT and root is None:
        raise CstarValueError(f"dataset {dataset!r} needs root= (the dataset root)")
    if dataset == "digits" and root is not None:
        raise CstarValueError(f"dataset 'digits' is built in and reads no files, so root={str(root)!r} would be "
                              "ignored; drop it, or name the dataset it belongs to (cifar10, cifar10-jpeg or folder)")
    if dataset == "digits":
        train, test = D.digits(seed=seed)
    elif dataset == "cifar10":
        train, test = D.cifar10(root)
    elif dataset == "cifar10-jpeg":
        train, test = D.cifar10_jpeg(root)
    else:
        train = D.image_folder(Path(root) / "train").with_augment("crop_flip")
        test = D.image_folder(Path(root) / "test")
    if limit:
        train, test = train.subset(limit), test.subset(max(limit // 4, 8))
    return train, test


def model_for(name: str, train: Any, *, stem: str = "cifar") -> nn.Module:
    """A randomly initialised model of :data:`MODELS` sized to the data: ``small_cnn`` takes the images'
    channel count; torchvision models (:func:`cstar_fx.models.build_model`) take ``stem`` and 3 channels.

    Example:
        >>> train, _ = load_data("digits", limit=16)
        >>> model_for("small_cnn", train)(train.x[:2].float()).shape
        torch.Size([2, 10])
    """
    if name == "small_cnn":
        return small_cnn(in_channels=train.input_shape[0], num_classes=train.num_classes)
    return build_model(name, num_classes=train.num_classes, stem=stem)


@dataclass(frozen=True)
class PipelineConfig:
    """What a pipeline run does; every field has the default of the ``cstar-fx compress`` option of that name,
    except ``eps`` (8/255 here; the CLI's default is :func:`default_eps` of its dataset) and ``export`` (the CLI's
    ``--no-export``).

    Compression: ``ratios``, ``methods`` (of :data:`METHODS`), ``budget`` ("params", "flops" or "both", the
    default), ``round_to``, ``skip`` (layer names or globs kept dense), ``calibrate`` (data-aware factorization images) and
    ``distill`` (robust distillation weight in every fine-tune), ``prune_share`` (share of the compression given to
    channel pruning before the factorization, method "decompose" only), ``prune_epochs`` (fine-tune epochs spent on
    the pruned network before it is factorized, out of ``finetune_epochs``; ``None``: the recommended recipe's
    where it applies, i.e. with a prune share and more fine-tune epochs than that, else 0). Training: ``teacher_epochs`` (0: the model
    is the teacher as given), ``joint_epochs`` (CSTAR's ADMM phase), ``finetune_epochs``, ``loss``, ``lr``
    (the teacher's; compression phases use lr/5), ``batch_size`` (global under torchrun), ``rho``.
    Attack: ``eps``, ``alpha`` (default eps/4), ``train_steps``, ``eval_steps``, ``eval_n`` test images,
    ``autoattack_n`` (0: no AutoAttack). Deployment: ``export`` (ONNX export and benchmark), ``int8``
    (also an int8 ONNX file per model, calibrated on ``calib_samples`` training images), ``bench_batch``,
    ``providers``, ``threads``. ``seed`` seeds everything.

    Example:
        >>> cfg = PipelineConfig(ratios=[4, 8], eps=0.1)
        >>> cfg.ratios, cfg.eval_attack.alpha, cfg.tune_config.lr
        ((4.0, 8.0), 0.025, 0.01)
    """

    ratios: Sequence[float] = (8.0,)
    methods: Sequence[str] = ("cstar", "decompose")
    budget: str = RECOMMENDED.budget
    round_to: int = 8
    skip: Sequence[str] = ()
    calibrate: int = RECOMMENDED.calibrate
    distill: float = RECOMMENDED.distill
    prune_share: float = RECOMMENDED.prune
    prune_epochs: int | None = None
    teacher_epochs: int = 10
    joint_epochs: int = 5
    finetune_epochs: int = 5
    loss: str = "pgd"
    lr: float = 0.05
    batch_size: int = 128
    rho: float | None = None
    eps: float = 8 / 255
    alpha: float | None = None
    train_steps: int = 7
    eval_steps: int = 20
    eval_n: int = 1000
    autoattack_n: int = 0
    export: bool = True
    int8: bool = False
    calib_samples: int = 256
    bench_batch: Sequence[int] = (1, 64)
    providers: Sequence[str] = (CUDA, CPU)
    threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("ratios", "methods", "skip", "bench_batch", "providers"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "ratios", tuple(float(r) for r in self.ratios))
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise CstarValueError(f"methods must be some of {', '.join(METHODS)}, got {list(self.methods)}")
        if not self.ratios or any(not r > 1 for r in self.ratios):
            raise CstarValueError(f"ratios must be numbers > 1, got {list(self.ratios)}")
        if len(set(self.ratios)) < len(self.ratios) or len(set(self.methods)) < len(self.methods):
            raise CstarValueError("ratios and methods must not repeat a value")
        object.__setattr__(self, "prune_share", check_prune_share(self.prune_share))
        if self.prune_share and self.budget not in PRUNE_BUDGETS and "decompose" in self.methods:
            raise CstarValueError(f"prune share {self.prune_share:g} splits the ratio of the decompose method "
                                  f"between pruning and low rank, which budget {self.budget!r} cannot count; "
                                  "use budget 'params', 'flops' or 'both', or set the prune share to 0")
        decompose = "decompose" in self.methods  # the only method the pruning share and its epochs apply to
        epochs = self.prune_epochs
        if epochs is None:  # the recipe's, where there is a pruned network and epochs left after it
            epochs = RECOMMENDED.prune_epochs if self.prune_share and self.finetune_epochs > RECOMMENDED.prune_epochs else 0
        object.__setattr__(self, "prune_epochs", check_prune_epochs(
            epochs, self.prune_share if decompose else None, self.finetune_epochs if decompose else None))
        self.joint_config  # noqa: B018 - builds (and so checks) every training and attack setting now

    @property
    def recipe(self) -> Recipe:
        """The decompose method's :class:`~cstar_fx.robust.Recipe` (its calibration, distillation, pruning share
        and epochs, budget)."""
        return Recipe(calibrate=self.calibrate, distill=self.distill, prune=self.prune_share,
                      prune_epochs=self.prune_epochs, budget=self.budget)

    @property
    def eval_attack(self) -> AttackConfig:
        """The evaluation attack: PGD-``eval_steps`` at ``eps``."""
        return self._train_attack.replace(steps=self.eval_steps)

    @property
    def _train_attack(self) -> AttackConfig:
        return AttackConfig(eps=self.eps, alpha=self.alpha if self.alpha is not None else self.eps / 4,
                            steps=self.train_steps)

    @property
    def teacher_config(self) -> TrainConfig:
        """The robust teacher's training."""
        return TrainConfig(epochs=self.teacher_epochs, batch_size=self.batch_size, lr=self.lr,
                           loss=LossConfig(self.loss, attack=self._train_attack), seed=self.seed)

    @property
    def tune_config(self) -> TrainConfig:
        """Every method's fine-tune after compression (same epochs for all, with robust distillation)."""
        teacher = self.teacher_config
        return teacher.replace(epochs=self.finetune_epochs, lr=self.lr / 5,
                               loss=teacher.loss.replace(distill=self.distill))

    @property
    def joint_config(self) -> JointConfig:
        """CSTAR's ADMM joint training, then the fine-tune."""
        joint = self.teacher_config.replace(epochs=self.joint_epochs, lr=self.lr / 5, schedule="constant")
        return JointConfig(joint=joint, finetune=self.tune_config,
                           admm=AdmmConfig(rho=self.rho, rho_max=max(10.0, self.rho or 0.0)))


@dataclass
class Int8Result:
    """The int8 ONNX file of one model (onnxruntime static QDQ), checked and evaluated through onnxruntime.

    ``agreement``: fraction of the ``n`` test images on which int8 and float predict the same class;
    ``max_abs``: the largest logit difference; ``clean``: int8 accuracy; ``pgd``: accuracy under PGD made on
    the float PyTorch model (a transfer attack, ``pgd_label`` says so); ``noise``: under random signs of
    size eps; ``size_ratio``: float file size / int8 file size; ``onnx``: the file, relative to the
    workspace (``None`` when it was not kept).

    Example:
        >>> Int8Result("onnx/dense_int8.onnx", 0.98, 0.3, 0.9, 0.4, 0.88, 100, 3.6, "PGD-20 transferred").clean
        0.9
    """

    onnx: str | None
    agreement: float
    max_abs: float
    clean: float
    pgd: float | None
    noise: float | None
    n: int
    size_ratio: float
    pgd_label: str


@dataclass
class DenseResult:
    """The teacher (dense model): parameters, FLOPs, clean / PGD / AutoAttack accuracy, and its int8 file.

    Example:
        >>> DenseResult(params=1000, flops=2e4, clean=0.9, pgd=0.5, autoattack=None).params
        1000
    """

    params: int
    flops: float | None
    clean: float
    pgd: float | None
    autoattack: float | None
    int8: Int8Result | None = None


@dataclass
class MethodResult:
    """One compressed model: ``method`` at ``ratio``, its size and ratios to the dense model, accuracies,
    the evaluation's sanity verdict, its plan and ONNX files (relative to the workspace), the per-layer
    ``[full, kept]`` rank of the output mode, the pruning granularity used (``round_to``) and its int8 file.

    Example:
        >>> MethodResult("decompose", 8.0, 1000, 7.9, 4.1, 0.8, 0.4, None, True, None, None, {}).label
        'decompose_8x'
    """

    method: str
    ratio: float
    params: int
    ratio_params: float
    ratio_flops: float | None
    clean: float
    pgd: float | None
    autoattack: float | None
    sanity_ok: bool | None
    plan: str | None
    onnx: str | None
    ranks: dict[str, list[int]]
    round_to: int | None = None
    int8: Int8Result | None = None

    @property
    def label(self) -> str:
        """``<method>_<ratio>x``, the name of its files and folders."""
        return run_label(self.method, self.ratio)


@dataclass
class Latency:
    """One onnxruntime measurement: a model on the provider it ran on at one batch size.

    Example:
        >>> Latency("dense", "CPUExecutionProvider", 1, 2.0, 2.4, 1.0).median_ms
        2.0
    """

    model: str
    provider: str
    batch: int
    median_ms: float
    p90_ms: float
    speedup: float | None


@dataclass
class PipelineResult:
    """Everything a pipeline run measured. :meth:`to_dict` is the ``results.json`` of ``cstar-fx compress``
    (schema in :mod:`cstar_fx.runreport`) and :meth:`from_dict` reads it back.

    ``config``: the options of the run; ``dense``: the teacher; ``runs``: one :class:`MethodResult` per
    method and ratio; ``bench``: onnxruntime latencies (``benchmark`` holds the full :class:`BenchResult`
    of this run, not serialized); ``timings``: seconds per stage.

    Example:
        >>> r = PipelineResult({"ratios": [4]}, "2026-01-01T00:00:00", "cpu")
        >>> r.dense = DenseResult(100, None, 0.9, 0.5, None)
        >>> PipelineResult.from_dict(r.to_dict()) == r
        True
    """

    config: dict[str, Any]
    created: str
    machine: str
    dense: DenseResult | None = None
    runs: list[MethodResult] = field(default_factory=list)
    bench: list[Latency] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    benchmark: BenchResult | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready results (optional entries that are ``None`` are left out: ``round_to``, ``int8``)."""

        def plain(obj: Any) -> dict[str, Any] | None:
            if obj is None:
                return None
            d = asdict(obj)
            for key in ("round_to", "int8"):
                if key in d and d[key] is None:
                    del d[key]
            return d

        return {"format": RESULTS_FORMAT, "config": dict(self.config), "created": self.created,
                "machine": self.machine, "dense": plain(self.dense), "runs": [plain(r) for r in self.runs],
                "bench": [asdict(b) for b in self.bench], "timings": dict(self.timings)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PipelineResult:
        """Read back :meth:`to_dict` (a validated ``results.json``)."""

        def build(kind: type, d: Mapping[str, Any] | None) -> Any:
            if d is None:
                return None
            names = {f.name for f in dataclasses.fields(kind)}
            values = {k: v for k, v in d.items() if k in names}
            if values.get("int8") is not None:
                values["int8"] = build(Int8Result, values["int8"])
            return kind(**values)

        return cls(dict(data["config"]), data.get("created", ""), data.get("machine", ""),
                   build(DenseResult, data.get("dense")), [build(MethodResult, r) for r in data["runs"]],
                   [build(Latency, b) for b in data["bench"]], dict(data["timings"]))


class Workspace(Protocol):
    """Where a pipeline writes its files: ``path`` is the folder; a file is ``reserve``-d before it is
    written (its path returned, the folder above it created), ``record`` is told about folders that a
    training run filled, and ``write_text`` writes a small file atomically. :class:`Directory` is a plain
    folder; :class:`cstar_fx.cli.runfolder.RunFolder` also lists every file in a marker.

    Example:
        >>> import tempfile
        >>> ws: Workspace = Directory(tempfile.mkdtemp())
        >>> ws.reserve("onnx/m.onnx").parent.is_dir()
        True
    """

    path: Path

    def reserve(self, name: str) -> Path: ...

    def record(self, *names: str) -> None: ...

    def write_text(self, name: str, text: str) -> None: ...


class Directory:
    """A plain folder as a :class:`Workspace` (created if missing; nothing is listed or deleted).

    Example:
        >>> import tempfile
        >>> d = Directory(Path(tempfile.mkdtemp()) / "run")
        >>> d.write_text("plans/a.json", "{}"); (d.path / "plans" / "a.json").read_text()
        '{}'
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def reserve(self, name: str) -> Path:
        """The path of ``name``, its folder created."""
        path = self.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def record(self, *names: str) -> None:
        """Nothing to record in a plain folder."""

    def write_text(self, name: str, text: str) -> None:
        """Write ``name`` atomically."""
        with atomic_path(self.reserve(name)) as tmp:
            tmp.write_text(text)


def run_label(method: str, ratio: float) -> str:
    """The name of one compressed model's files and folders.

    Example:
        >>> run_label("cstar", 8.0)
        'cstar_8x'
    """
    return f"{method}_{ratio:g}x"


def _ranks(plan: Any) -> dict[str, list[int]]:
    """Per layer ``[full rank, kept rank]`` of the output mode (the bar plot's data)."""
    out = {}
    for name, lp in plan.layers.items():
        full = min(lp.weight_shape[0], math.prod(lp.weight_shape[1:]))
        out[name] = [full, lp.ranks[0] if lp.factorized else full]
    return out


def _compress(method: str, model: nn.Module, train: Any, ratio: float, cfg: PipelineConfig, example: torch.Tensor,
              run_dir: Path, device: torch.device, prune_round_to: int) -> tuple[nn.Module, Any, int | None]:
    """The compressed, fine-tuned model, its rank plan (None for pruning) and the pruning granularity used."""
    from .passes.prune import prune_to_ratio_finer

    plan_options = {"budget": cfg.budget, "round_to": cfg.round_to, "skip": cfg.skip}
    ex = example.to(device)
    try:
        if method == "cstar":
            gm = robust.cstar(model, train, ratio, cfg.joint_config, example_inputs=ex, run_dir=run_dir, device=device,
                              calibrate=cfg.calibrate, **plan_options)
            return gm, get_plan(gm), None
        if method == "decompose":
            gm = robust.compress(model, train, ratio, cfg.tune_config, recipe=cfg.recipe, example_inputs=ex,
                                 run_dir=run_dir, device=device, round_to=cfg.round_to, skip=cfg.skip)
            return gm, get_plan(gm), None
        tune = cfg.tune_config
        pruned, used = prune_to_ratio_finer(model, ratio, ex, round_to=prune_round_to, budget=cfg.budget)
        robust.recalibrate_bn(pruned, train, batch_size=tune.batch_size, seed=tune.seed, device=device)
        robust.finetune(pruned, train, tune, run_dir=run_dir / "finetune", device=device,
                        teacher=model_on(model, device) if tune.loss.distill > 0 else None)
        return pruned, None, used
    except UnreachableBudgetError as exc:
        raise UnreachableBudgetError(f"{method} at {ratio:g}x: {str(exc).splitlines()[0]}", exc.max_ratio) from None


class Pipeline:
    """One model through the whole pipeline. Building it checks, before any training, that every method
    reaches every ratio (reachability depends on the layer shapes only); :meth:`run` does the work.

    ``model`` is trained in place as the teacher (unless ``config.teacher_epochs`` is 0). ``train`` and
    ``test`` are TensorData (:func:`load_data`). ``device``: where training and evaluation run.
    ``options``: what to record as the run's configuration in the result (default: the config's fields).
    ``notes``: what the checks found worth saying (a finer pruning granularity than ``round_to``).
    Raises ``ValueError`` naming the method and ratio that cannot be reached, and ``ImportError`` when
    pruning is asked for without Torch-Pruning.

    Example:
        >>> train, test = load_data("digits", limit=64)
        >>> p = Pipeline(model_for("small_cnn", train), train, test, PipelineConfig(ratios=(4,), export=False))
        >>> p.notes
        []
    """

    def __init__(self, model: nn.Module, train: Any, test: Any, config: PipelineConfig | None = None, *,
                 device: str | torch.device = "cpu", options: Mapping[str, Any] | None = None) -> None:
        self.model, self.train, self.test = model, train, test
        self.config = config if config is not None else PipelineConfig()
        self.device = torch.device(device)
        self.options = dict(options) if options is not None else {
            k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.config).items()}  # as JSON reads back
        self.example = torch.rand(1, *train.input_shape)
        self.notes: list[str] = []
        self.granularity = self._reachable()

    def _reachable(self) -> dict[float, int]:
        """The pruning granularity per ratio; raises for a (method, ratio) that cannot be reached."""
        from .passes.prune import prune_to_ratio_finer

        cfg = self.config
        granularity = {}
        lowrank = [m for m in cfg.methods if m != "prune"]
        for ratio in cfg.ratios:
            if lowrank:
                try:
                    plan_ranks(self.model, ratio, budget=cfg.budget, round_to=cfg.round_to, skip=cfg.skip,
                               example_inputs=self.example)
                except (ValueError, TypeError) as exc:
                    raise CstarValueError(f"{'/'.join(lowrank)} at {ratio:g}x: {exc}") from None
            if "prune" in cfg.methods:
                try:
                    _, granularity[ratio] = prune_to_ratio_finer(self.model, ratio, self.example, round_to=cfg.round_to,
                                                                 budget=cfg.budget)
                except ImportError as exc:
                    raise MissingExtraError(f"method 'prune' needs Torch-Pruning: pip install 'cstar-fx[pruning]' "
                                            f"({exc})") from None
                except (ValueError, TypeError) as exc:
                    raise CstarValueError(f"prune at {ratio:g}x: {exc}") from None
                if granularity[ratio] != cfg.round_to:
                    self.notes.append(f"prune at {ratio:g}x: whole multiples of {cfg.round_to} channels cannot get "
                                      f"within 3% of it; pruning in multiples of {granularity[ratio]}")
        return granularity

    def run(self, workspace: Workspace | None = None, *, resume: PipelineResult | None = None,
            teacher: Path | None = None, on_stage: Callable[[str], Any] | None = None,
            on_result: Callable[[PipelineResult], Any] | None = None) -> PipelineResult:
        """Train the teacher, compress, evaluate, export and benchmark; return the result.

        ``workspace`` receives ``teacher.pt``, the training folders (``teacher/``, ``<method>_<ratio>x/``),
        ``plans/`` and ``onnx/``; without one, a temporary folder is used and removed (the result's file
        entries are then ``None``). ``resume``: the result of an earlier, interrupted run of the same config
        in this workspace; its dense model and finished runs are kept, not redone. ``teacher``: that run's
        saved teacher state dict, loaded instead of training. ``on_stage(name)`` is called as each stage
        starts; ``on_result(result)`` after the dense model and after each compressed model (to save
        progress).

        Example:
            >>> result = Pipeline(model, train, test, cfg).run(Directory("runs/x"))  # doctest: +SKIP
        """
        with contextlib.ExitStack() as stack:
            keep = workspace is not None
            if workspace is None:
                workspace = Directory(stack.enter_context(tempfile.TemporaryDirectory(prefix="cstar_pipeline_")))
            return self._run(workspace, keep, resume, teacher, on_stage, on_result)

    def _run(self, workspace: Workspace, keep: bool, resume: PipelineResult | None, teacher: Path | None,
             on_stage: Callable[[str], Any] | None, on_result: Callable[[PipelineResult], Any] | None
             ) -> PipelineResult:
        cfg, device, out = self.config, self.device, workspace.path
        writes = is_main_process()
        export = cfg.export and writes
        result = PipelineResult(
            {**self.options, "eval_attack": f"PGD-{cfg.eval_steps} linf eps={cfg.eps:.4g}"},
            resume.created if resume else dt.datetime.now().isoformat(timespec="seconds"), describe(),
            resume.dense if resume else None, timings=dict(resume.timings) if resume else {})

        @contextlib.contextmanager
        def stage(name: str) -> Iterator[None]:
            if on_stage is not None:
                on_stage(name)
            start = time.perf_counter()
            yield
            result.timings[name] = time.perf_counter() - start

        def saved() -> None:
            if on_result is not None:
                on_result(result)

        model = self.model.to(device)
        if teacher is not None:
            load_weights(model, teacher)
        else:
            with stage("teacher"):
                if cfg.teacher_epochs > 0:
                    try:
                        robust.finetune(model, self.train, cfg.teacher_config, run_dir=out / "teacher", device=device)
                    finally:
                        if writes:
                            workspace.record("teacher")
                if writes:
                    with atomic_path(workspace.reserve("teacher.pt")) as tmp:
                        torch.save(model.state_dict(), tmp)

        if result.dense is None:
            with stage("evaluate dense"):
                ev = self._evaluate(model)
                result.dense = DenseResult(sum(p.numel() for p in model.parameters()),
                                           count_flops(model.cpu(), self.example), ev.clean, ev.pgd,
                                           ev.robust.get("autoattack"))
                model.to(device)
            if export:
                self._export(workspace, model, "dense")
                if cfg.int8:
                    result.dense.int8 = self._int8(workspace, model, "dense", keep)
                model.to(device)
        saved()

        finished = {r.label: r for r in resume.runs} if resume else {}
        for ratio in cfg.ratios:
            for method in cfg.methods:
                label = run_label(method, ratio)
                if label in finished:  # done in an earlier, interrupted run of the same options
                    result.runs.append(finished[label])
                    continue
                with stage(f"compress {label}"):
                    torch.manual_seed(cfg.seed)  # each result depends on the options only, resumed or not
                    try:
                        gm, plan, used = _compress(method, model, self.train, ratio, cfg, self.example, out / label,
                                                   device, self.granularity.get(ratio, cfg.round_to))
                    finally:
                        if writes:
                            workspace.record(label)
                    result.runs.append(self._method_result(workspace, keep, export, method, ratio, gm, plan, used,
                                                           result.dense))
                    saved()  # this result is on disk now, whatever happens to the next one

        if export:
            with stage("benchmark"):
                onnx = {"dense": "onnx/dense.onnx", **{r.label: f"onnx/{r.label}.onnx" for r in result.runs}}
                if cfg.int8:
                    onnx.update({f"{name}_int8": f"onnx/{name}_int8.onnx" for name in list(onnx)})
                res = benchmark({name: out / path for name, path in onnx.items()}, providers=cfg.providers,
                                batch_sizes=cfg.bench_batch, baseline="dense", intra_op_threads=cfg.threads)
                result.benchmark = res
                result.bench = [Latency(b.model, b.ran_on, b.batch, b.median_ms, b.p90_ms, b.speedup)
                                for b in res.rows]
        return result

    def _method_result(self, workspace: Workspace, keep: bool, export: bool, method: str, ratio: float, gm: nn.Module,
                       plan: Any, used: int | None, dense: DenseResult) -> MethodResult:
        label = run_label(method, ratio)
        ev = self._evaluate(gm)
        gm_cpu = gm.cpu()
        params = sum(p.numel() for p in gm_cpu.parameters())
        flops = count_flops(gm_cpu, self.example)
        plan_file = f"plans/{label}.json" if plan is not None else None
        if plan is not None and is_main_process():
            workspace.write_text(plan_file, plan.to_json())
        run = MethodResult(method, ratio, params, dense.params / params, dense.flops / flops if flops else None,
                           ev.clean, ev.pgd, ev.robust.get("autoattack"),
                           ev.sanity.ok if ev.sanity is not None else None, plan_file if keep else None, None,
                           _ranks(plan) if plan is not None else {}, used)
        if export:
            self._export(workspace, gm_cpu, label)
            run.onnx = f"onnx/{label}.onnx" if keep else None
            if self.config.int8:
                run.int8 = self._int8(workspace, gm_cpu, label, keep)
        return run

    def _evaluate(self, model: nn.Module) -> Any:
        cfg = self.config
        attacks = ("pgd", "autoattack") if cfg.autoattack_n else ("pgd",)
        return robust.evaluate(model, self.test, attacks, attack=cfg.eval_attack, n=cfg.eval_n,
                               autoattack_n=cfg.autoattack_n or None, device=self.device, seed=cfg.seed)

    def _export(self, workspace: Workspace, model: nn.Module, label: str) -> Path:
        return to_onnx(model.cpu(), self.example, workspace.reserve(f"onnx/{label}.onnx"))

    def _int8(self, workspace: Workspace, model: nn.Module, label: str, keep: bool) -> Int8Result:
        """Quantize ``onnx/<label>.onnx`` to ``onnx/<label>_int8.onnx`` and evaluate it through onnxruntime."""
        cfg = self.config
        name = f"onnx/{label}_int8.onnx"
        checked = self.test.subset(min(cfg.eval_n, len(self.test)))
        q = quantize_int8(workspace.path / f"onnx/{label}.onnx", self.train, workspace.reserve(name),
                          num_calibration=cfg.calib_samples, check_images=checked)
        adversarial = pgd_examples(model.cpu(), checked, eps=cfg.eps, steps=cfg.eval_steps,
                                   alpha=cfg.eval_attack.alpha, seed=cfg.seed)
        ev = evaluate_onnx(q.path, checked, adversarial=adversarial, eps=cfg.eps, pgd_steps=cfg.eval_steps,
                           threads=cfg.threads, seed=cfg.seed)
        return Int8Result(name if keep else None, q.agreement, q.max_abs, ev.clean, ev.pgd, ev.noise, ev.n,
                          q.size_ratio, ev.pgd_label)
