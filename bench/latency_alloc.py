"""Latency-aware plan vs parameter-budget plan at the same parameter ratio (CIFAR ResNet-18).

For each plan: predicted latency (from the measured op table) and measured end-to-end latency of the
whole model, dense and compressed measured side by side in one process, plus the mean kept energy of
the factorized layers (the spectral proxy for accuracy before fine-tuning).

    python bench/latency_alloc.py --batch 1 --threads 2          # onnxruntime CPU EP
    python bench/latency_alloc.py --provider CUDAExecutionProvider --batch 256 --dtype float16   # on a GPU
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from pathlib import Path

import torch

import cstar_fx
from cstar_fx.latency import LatencyCost, LatencyTarget, predict, validate
from cstar_fx.models import cifar_resnet18
from cstar_fx.schemes import conv_scheme_names
from _common import OUT, write


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--provider", default="CPUExecutionProvider")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    p.add_argument("--param-ratio", type=float, default=8.0)
    p.add_argument("--speedups", type=float, nargs="+", default=[2.0, 2.5, 3.0, 4.0, 6.0, 8.0])
    p.add_argument("--conv-scheme", default="auto", choices=conv_scheme_names())
    p.add_argument("--table", type=Path, default=OUT / "latency_table.json")
    args = p.parse_args()

    torch.manual_seed(0)
    model = cifar_resnet18().eval()
    x = torch.rand(1, 3, 32, 32)
    target = LatencyTarget(provider=args.provider, batch_size=args.batch, threads=args.threads, dtype=args.dtype)
    cost = LatencyCost(target, path=args.table)
    t0 = time.perf_counter()
    plans = {f"params {args.param_ratio:g}x": cstar_fx.plan_ranks(model, args.param_ratio, example_inputs=x)}
    for s in args.speedups:  # every reachable latency target under the parameter cap: the trade-off curve
        try:
            plans[f"latency {s:g}x + params {args.param_ratio:g}x ({args.conv_scheme})"] = cstar_fx.plan_ranks(
                model, budget="latency", target_speedup=s, param_ratio=args.param_ratio, cost_model=cost,
                example_inputs=x, conv_scheme=args.conv_scheme)
        except cstar_fx.UnreachableBudgetError as err:
            print(f"latency plan at {s}x: unreachable ({str(err).splitlines()[0][:100]})")
            break
    plan_s = time.perf_counter() - t0
    rows = []
    for label, plan in plans.items():
        gm = cstar_fx.transform(model, plan=plan)
        dense_pred, pred = predict(plan, model, x, cost)
        gm.meta["cstar_plan"] = plan if plan.budget == "latency" else _as_latency(plan, dense_pred, pred)
        check = validate(model, gm, x, target)
        schemes = collections.Counter(lp.scheme for lp in plan.factorized.values())
        rows.append({"plan": label, "schemes": ", ".join(f"{n} {k}" for k, n in sorted(schemes.items())),
                     "params_ratio": plan.ratio_params, "flops_ratio": plan.ratio_flops,
                     "mean_energy": statistics.fmean(lp.energy for lp in plan.factorized.values()),
                     "pred_ms": check.predicted, "meas_ms": check.measured, "meas_dense_ms": check.measured_dense,
                     "pred_speedup": check.predicted_speedup, "meas_speedup": check.measured_speedup,
                     "pred_error": check.error})
    print(write(f"latency_alloc_{args.provider.replace('ExecutionProvider', '').lower()}_b{args.batch}_{args.dtype}", rows, list(rows[0]), {
        "command": "python bench/latency_alloc.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                            [("provider", args.provider), ("batch", args.batch),
                                                             ("threads", args.threads), ("dtype", args.dtype),
                                                             ("conv-scheme", args.conv_scheme)]),
        "model": "CIFAR ResNet-18, random init (seed 0), 1x3x32x32", "target": target.key(),
        "ops measured": cost.measured, "planning time s": round(plan_s, 1)}))


def _as_latency(plan, dense_ms, ms):
    from dataclasses import replace

    return replace(plan, budget="latency", dense_cost=dense_ms, cost=ms)


if __name__ == "__main__":
    main()
