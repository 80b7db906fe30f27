"""Robust evaluation: clean accuracy, PGD-k accuracy, optional AutoAttack, and sanity checks for gradient masking.

Every :func:`evaluate` call also runs cheap checks on a subset (Carlini et al. 2019, "On Evaluating
Adversarial Robustness"): PGD at eps=0 must reproduce the clean accuracy; robust accuracy must not
exceed clean accuracy; accuracy must not rise with eps; at a very large eps it must be near zero;
PGD must be at least as strong as random noise of the same size; input gradients must not vanish.
A failure is reported in the result (``result.sanity``) and warned about, because it usually
means the robust numbers come from masked gradients rather than from robustness.

AutoAttack runs through ``pyautoattack`` (the authors' reference implementation), the optional
extra ``pip install 'cstar-fx[robust]'``.

Example:
    >>> from cstar_fx.data import digits
    >>> from cstar_fx.models import small_cnn
    >>> attack = AttackConfig(eps=0.1, alpha=0.025, steps=5)
    >>> res = evaluate(small_cnn(width=8), digits()[1].subset(64), attack=attack, sanity=False)
    >>> sorted(res.robust)
    ['pgd5']
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import TensorData, as_loader
from ..errors import CstarKeyError, CstarTypeError, CstarValueError, MissingExtraError
from ..extras import require
from ..torchutil import eval_mode, model_device, private_rng
from . import distributed as D
from .attacks import as_logits, fgsm, pgd_attack, project_delta
from .config import AttackConfig

__all__ = ["evaluate", "autoattack", "RobustResult", "SanityReport", "Check", "MissingExtraError", "ATTACKS"]

ATTACKS = ("pgd", "fgsm", "autoattack", "apgd")
_SWEEP = (0.0, 0.5, 1.0, 2.0)
_MASKING_CHECKS = ("monotone_in_eps", "near_zero_at_large_eps", "pgd_beats_noise", "nonzero_input_gradients")


@dataclass(frozen=True)
class Check:
    """One sanity check: did it pass, the measured value and what it means.

    Example:
        >>> Check("robust_le_clean", True, 0.0, "ok").passed
        True
    """

    name: str
    passed: bool
    value: float
    detail: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"name": self.name, "passed": self.passed, "value": self.value, "detail": self.detail}


@dataclass(frozen=True)
class SanityReport:
    """The sanity checks of one evaluation, run on ``n`` examples, with the accuracy-vs-eps curve.

    ``gradient_masking`` is True when a check that detects masked or obfuscated gradients failed.

    Example:
        >>> rep = SanityReport((Check("nonzero_input_gradients", False, 1.0, "all zero"),), (), 8)
        >>> rep.gradient_masking, rep.ok
        (True, False)
    """

    checks: tuple[Check, ...]
    eps_curve: tuple[tuple[float, float], ...]
    n: int

    @property
    def ok(self) -> bool:
        """All checks passed."""
        return all(c.passed for c in self.checks)

    @property
    def gradient_masking(self) -> bool:
        """A gradient-masking check failed: treat the robust accuracy as an upper bound at best."""
        return any(not c.passed for c in self.checks if c.name in _MASKING_CHECKS)

    @property
    def failed(self) -> list[str]:
        """Names of the failed checks."""
        return [c.name for c in self.checks if not c.passed]

    def __getitem__(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise CstarKeyError(f"no sanity check {name!r}; have {[c.name for c in self.checks]}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"n": self.n, "ok": self.ok, "gradient_masking": self.gradient_masking,
                "checks": [c.to_dict() for c in self.checks], "eps_curve": [list(p) for p in self.eps_curve]}

    def __str__(self) -> str:
        lines = [f"sanity checks on {self.n} examples: " + ("all passed" if self.ok else "FAILED: " + ", ".join(self.failed))]
        lines += [f"  [{'ok' if c.passed else 'FAIL'}] {c.name}: {c.detail}" for c in self.checks]
        return "\n".join(lines)


@dataclass(frozen=True)
class RobustResult:
    """Accuracies of one model: ``clean`` and ``robust[name]`` (e.g. ``"pgd20"``, ``"autoattack"``), in [0, 1].

    ``counts[name]`` is how many examples each number was measured on (AutoAttack usually fewer);
    ``sanity`` holds the sanity checks (``None`` when disabled).

    Example:
        >>> r = RobustResult(100, 0.9, {"pgd20": 0.4}, {"clean": 100, "pgd20": 100}, AttackConfig(steps=20), None, 1.0)
        >>> r.pgd
        0.4
    """

    n: int
    clean: float
    robust: dict[str, float]
    counts: dict[str, int]
    attack: AttackConfig
    sanity: SanityReport | None
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pgd(self) -> float | None:
        """The PGD accuracy (the first ``pgd*`` entry), or ``None``."""
        return next((v for k, v in self.robust.items() if k.startswith("pgd")), None)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"n": self.n, "clean": self.clean, "robust": dict(self.robust), "counts": dict(self.counts),
                "attack": self.attack.to_dict(), "seconds": self.seconds, "extra": dict(self.extra),
                "sanity": self.sanity.to_dict() if self.sanity is not None else None}

    def __str__(self) -> str:
        a = self.attack
        head = f"{a.norm} eps={a.eps:.4g}"
        rows = [f"clean        {100 * self.clean:6.2f}%  (n={self.counts.get('clean', self.n)})"]
        rows += [f"{k:<12} {100 * v:6.2f}%  (n={self.counts.get(k, self.n)}, {head})" for k, v in self.robust.items()]
        if self.sanity is not None:
            rows.append(str(self.sanity))
        return "\n".join(rows)


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
               version: str = "standard", batch_size: int = 256, seed: int = 0) -> torch.Tensor:
    """Adversarial examples from AutoAttack (APGD-CE, APGD-T, FAB-T, Square for ``"standard"``).

    ``version="apgd"`` runs the standard version's first two attacks only (APGD-CE, then APGD-T on
    9 target classes): about a tenth of the time on a CPU, and FAB-T and Square rarely lower the
    accuracy they leave (report it as "APGD-CE + APGD-T", not as AutoAttack).

    Needs the optional extra: ``pip install 'cstar-fx[robust]'`` (pyautoattack). Runs in fp32 with the
    model in eval mode (training flags restored afterwards).

    Example:
        >>> x_adv = autoattack(model, x, y, eps=8 / 255)  # doctest: +SKIP
    """
    (pyautoattack,) = require("pyautoattack", purpose="AutoAttack (the authors' reference implementation)")
    norms = {"linf": "Linf", "l2": "L2"}
    if norm not in norms:
        raise CstarValueError(f"norm must be one of {tuple(norms)}, got {norm!r}")
    if version not in ("standard", "apgd"):
        raise CstarValueError(f"version must be 'standard' or 'apgd', got {version!r}")
    device = x.device
    with eval_mode(model), private_rng(device, seed):
        aa = pyautoattack.AutoAttack(model, eps=float(eps), norm=norms[norm], version="standard", device=device, seed=seed)
        if version == "apgd":
            aa.attacks_to_run = ["apgd-ce", "apgd-t"]
        x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=batch_size)
    return x_adv.detach()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    if x.shape[0] == 0:  # an empty shard of a distributed evaluation
        return torch.zeros(0, dtype=torch.bool, device=x.device)
    with torch.no_grad(), eval_mode(model):
        return torch.cat([as_logits(model(x[i:i + batch_size])).argmax(1) == y[i:i + batch_size]
                          for i in range(0, x.shape[0], batch_size)])


def _pgd_acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor, a: AttackConfig, batch_size: int) -> float:
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        adv = pgd_attack(model, xb, yb, a)
        correct += int(_accuracy(model, adv, yb, batch_size).sum())
    return correct / max(1, x.shape[0])


def _zero_grad_fraction(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with eval_mode(model), torch.enable_grad():
        x = x.clone().requires_grad_(True)
        loss = F.cross_entropy(as_logits(model(x)).float(), y.long(), reduction="sum")
        (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    if grad is None:
        return 1.0
    per_example = grad.flatten(1).abs().amax(1)
    return float(((per_example == 0) | ~torch.isfinite(per_example)).float().mean())


def _sanity(model: nn.Module, x: torch.Tensor, y: torch.Tensor, a: AttackConfig, clean: float,
            robust: dict[str, float], batch_size: int) -> SanityReport:
    n = x.shape[0]
    tol = max(0.01, 2.0 / n)
    sweep = a.replace(steps=min(a.steps, 10), restarts=1)
    # eps=0 needs only to run the attack's code path once, not to converge.
    curve = tuple((m * a.eps, _pgd_acc(model, x, y, sweep.scaled(m * a.eps).replace(steps=2 if m == 0 else sweep.steps),
                                       batch_size)) for m in _SWEEP)
    sub_clean = int(_accuracy(model, x, y, batch_size).sum()) / n
    checks = [Check("eps0_equals_clean", curve[0][1] == sub_clean, curve[0][1] - sub_clean,
                    f"PGD at eps=0 {100 * curve[0][1]:.2f}% vs clean {100 * sub_clean:.2f}% (must be equal; "
                    "a difference means a randomised or stateful model, or a broken input pipeline)")]
    worst = max(robust.values()) if robust else clean
    checks.append(Check("robust_le_clean", worst <= clean + 1e-12, worst - clean,
                        f"highest robust accuracy {100 * worst:.2f}% vs clean {100 * clean:.2f}%"))
    rises = [(e0, e1) for (e0, a0), (e1, a1) in zip(curve, curve[1:]) if a1 > a0 + tol]
    checks.append(Check("monotone_in_eps", not rises, max((a1 - a0 for (_, a0), (_, a1) in zip(curve, curve[1:])), default=0.0),
                        "accuracy " + " -> ".join(f"{100 * acc:.1f}%@{e:.3g}" for e, acc in curve)
                        + (f"; rises between eps {rises}" if rises else "")))
    big = 1.0 if a.norm == "linf" else math.sqrt(x[0].numel())  # the whole [0, 1] box is reachable
    big_acc = _pgd_acc(model, x, y, a.replace(eps=big, alpha=big / 4, steps=10, restarts=1), batch_size)
    limit = max(0.05, 2.0 / n)
    checks.append(Check("near_zero_at_large_eps", big_acc <= limit, big_acc,
                        f"{100 * big_acc:.2f}% at eps={big:.3g} (must be <= {100 * limit:.1f}%; higher means the "
                        "attack cannot follow the gradients)"))
    noise = x + project_delta(torch.empty_like(x).uniform_(-a.eps, a.eps), x, a.eps, a.norm)
    noise_acc = int(_accuracy(model, noise, y, batch_size).sum()) / n
    pgd_acc = dict(curve)[a.eps]
    checks.append(Check("pgd_beats_noise", pgd_acc <= noise_acc + tol, pgd_acc - noise_acc,
                        f"PGD {100 * pgd_acc:.2f}% vs uniform noise {100 * noise_acc:.2f}% at eps={a.eps:.3g}"))
    zero = _zero_grad_fraction(model, x, y)
    checks.append(Check("nonzero_input_gradients", zero <= 0.05, zero,
                        f"{100 * zero:.1f}% of examples have an all-zero (or non-finite) input gradient"))
    return SanityReport(tuple(checks), curve, n)


def _collect(data: Any, n: int | None, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, TensorData):
        return data.subset(n if n is not None else len(data)).tensors(device)
    xs, ys, seen = [], [], 0
    for x, y in as_loader(data, batch_size, False, device):
        xs.append(x)
        ys.append(y)
        seen += y.shape[0]
        if n is not None and seen >= n:
            break
    if not xs:
        raise CstarValueError("the evaluation data is empty")
    x, y = torch.cat(xs), torch.cat(ys)
    return (x[:n], y[:n]) if n is not None else (x, y)


def _shard(t: torch.Tensor, w: D.World) -> torch.Tensor:
    # Contiguous, near-equal shares: the ranks only meet to sum counts, so sizes may differ by one.
    return torch.tensor_split(t, w.size)[w.rank] if w.active else t


def evaluate(model: nn.Module, data: Any, attacks: Sequence[str] = ("pgd",), *, attack: AttackConfig | None = None,
             n: int | None = None, autoattack_n: int | None = None, batch_size: int = 256,
             device: str | torch.device | None = None, sanity: bool = True, sanity_n: int = 256,
             amp: bool = False, seed: int = 0, progress: bool = True,
             distributed: bool | None = None) -> RobustResult:
    """Clean and robust accuracy of ``model`` on the first ``n`` examples of ``data`` (inputs in [0, 1]).

    ``attacks``: any of ``"pgd"`` (PGD with ``attack``, default PGD-20 L_inf eps 8/255 step 2/255;
    reported as ``"pgd<steps>"``), ``"fgsm"``, ``"autoattack"`` (standard AutoAttack on the first
    ``autoattack_n`` examples; needs ``pip install 'cstar-fx[robust]'``) and ``"apgd"`` (its APGD-CE
    and APGD-T only, on the same examples: see :func:`autoattack`). ``sanity`` runs the
    gradient-masking checks on the first ``sanity_n`` examples. ``amp`` runs the model under bf16
    autocast on CUDA (fp32 otherwise). Random starts are seeded by ``seed``; the model's training
    flags are restored.

    Under ``torchrun`` (an initialised process group, unless ``distributed=False``) call it on every
    rank: each rank attacks its contiguous share of the ``n`` examples (and of the AutoAttack subset),
    the correct counts are summed over the ranks, the sanity checks run on rank 0 and every rank
    returns the same result. Clean accuracy equals a single-process run; the PGD random starts are
    drawn per rank, so robust accuracy agrees in distribution rather than bit for bit.

    Example:
        >>> res = evaluate(model, test, attacks=("pgd", "autoattack"), n=2000, autoattack_n=500)  # doctest: +SKIP
        >>> print(res)  # doctest: +SKIP
    """
    attack = AttackConfig(steps=20) if attack is None else attack
    if not isinstance(attack, AttackConfig):
        raise CstarTypeError(f"attack must be an AttackConfig, got {type(attack).__name__}")
    for name, value, allow_none in (("n", n, True), ("autoattack_n", autoattack_n, True),
                                    ("batch_size", batch_size, False), ("sanity_n", sanity_n, False)):
        if value is None and allow_none:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CstarValueError(f"{name} must be an int >= 1{' or None' if allow_none else ''}, got {value!r}")
    if isinstance(attacks, str):
        attacks = (attacks,)
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise CstarValueError(f"unknown attack(s) {unknown}; choose from {ATTACKS}")
    if "fgsm" in attacks and attack.norm != "linf":
        raise CstarValueError("fgsm is an L_inf attack; drop it or use AttackConfig(norm='linf')")
    for name in ("autoattack", "apgd"):
        if name not in attacks:
            continue
        require("pyautoattack", purpose=f"attacks=('{name}',)")  # fail before the long PGD run, not after
    dev = torch.device(device) if device is not None else model_device(model)
    w = D.world(distributed)
    t0 = time.perf_counter()
    x, y = _collect(data, n, batch_size, dev)
    total = x.shape[0]
    if total == 0:
        raise CstarValueError("the evaluation data is empty (0 examples); pass data with at least one example")
    if y.ndim != 1 or y.is_floating_point():
        raise CstarValueError(f"labels must be a 1-D tensor of class indices, got shape {tuple(y.shape)} {y.dtype}; "
                              f"pass y.view(-1).long()")
    y = y.long()
    xs, ys = _shard(x, w), _shard(y, w)
    amp_ctx = torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and dev.type == "cuda")
    from tqdm.auto import tqdm

    robust: dict[str, float] = {}
    counts = {"clean": total}
    with amp_ctx, private_rng(dev, D.rank_seed(seed, w.rank)):
        correct = [int(_accuracy(model, xs, ys, batch_size).sum())]
        names = {"pgd": f"pgd{attack.steps}", "fgsm": "fgsm"}
        run = [a for a in attacks if a in names]
        for name in run:
            hits = 0
            for i in tqdm(range(0, xs.shape[0], batch_size), desc=names[name], disable=not progress or not w.is_main,
                          leave=False):
                xb, yb = xs[i:i + batch_size], ys[i:i + batch_size]
                if name == "pgd":
                    adv = pgd_attack(model, xb, yb, attack)
                else:
                    adv = fgsm(model, xb, yb, eps=attack.eps)
                hits += int(_accuracy(model, adv, yb, batch_size).sum())
            correct.append(hits)
        sums = D.all_reduce_sum(correct)
        clean = sums[0] / max(1, total)
        for name, total_hits in zip(run, sums[1:]):
            robust[names[name]] = total_hits / max(1, total)
            counts[names[name]] = total
        report = None
        if sanity:
            k = min(sanity_n, total)
            if w.is_main:
                report = _sanity(model, x[:k], y[:k], attack, clean, robust, batch_size)
            report = D.broadcast_object(report)
    for name in [a for a in ("autoattack", "apgd") if a in attacks]:
        k = min(autoattack_n or total, total)
        xk, yk = _shard(x[:k], w), _shard(y[:k], w)
        hits = 0
        if xk.shape[0]:
            adv = autoattack(model, xk, yk, eps=attack.eps, norm=attack.norm, batch_size=batch_size, seed=seed,
                             version="standard" if name == "autoattack" else "apgd")
            hits = int(_accuracy(model, adv, yk, batch_size).sum())
        robust[name] = D.all_reduce_sum([hits])[0] / max(1, k)
        counts[name] = k
    if report is not None and not report.ok and w.is_main:
        warnings.warn(f"robust evaluation sanity checks failed ({', '.join(report.failed)}); "
                      + ("the model likely masks gradients, so robust accuracy is overestimated. "
                         if report.gradient_masking else "") + "See result.sanity for details.", stacklevel=2)
    return RobustResult(total, clean, robust, counts, attack, report, time.perf_counter() - t0)
