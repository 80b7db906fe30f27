#!/usr/bin/env bash
# The CPU profile of bench/robust_table.py in the order that answers the main question first:
# the four main methods, then the ablations and the other baselines, then AutoAttack. Resumable:
# re-running skips finished cells. Log: bench/out/robust_cpu.log
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
"$py" bench/robust_table.py --profile cpu --methods transform_ft prune_ft data_distill prune_distill
"$py" bench/robust_table.py --profile cpu --methods transform_ft prune_ft data_distill prune_distill data_ft transform_distill cstar uniform_ft
"$py" bench/robust_table.py --profile cpu --autoattack
