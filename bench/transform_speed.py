"""How long `transform` takes, and what the 8x plans look like (CPU).

    python bench/transform_speed.py            # writes bench/out/transform_speed.{json,md}
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

import cstar_fx
from _common import write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=8.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name in ("resnet18", "resnet50"):
        model = getattr(torchvision.models, name)(num_classes=1000).eval()
        x = torch.randn(1, 3, 224, 224)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            gm = cstar_fx.transform(model, args.ratio)
            times.append(time.perf_counter() - t0)
        plan = cstar_fx.plan_ranks(model, args.ratio, example_inputs=x)
        kinds = [lp.scheme for lp in plan.layers.values()]
        rows.append({
            "model": name, "transform_s": statistics.median(times), "params_dense": plan.dense_params,
            "params": plan.params, "ratio_params": plan.ratio_params, "ratio_flops": plan.ratio_flops,
            "tucker2": kinds.count("tucker2"), "svd": kinds.count("svd"), "dense": kinds.count("dense"),
            "mean_energy": statistics.fmean(lp.energy for lp in plan.factorized.values()),
        })
        del gm
    print(write("transform_speed", rows, list(rows[0]), {
        "command": "python bench/transform_speed.py", "ratio": args.ratio, "weights": "random init (torch.manual_seed(0))",
        "input for FLOPs": "1x3x224x224", "transform_s": f"median of {args.repeats}, without example_inputs"}))


if __name__ == "__main__":
    main()
