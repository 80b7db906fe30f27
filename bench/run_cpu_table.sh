#!/usr/bin/env bash
# The CPU profile of bench/robust_table.py in the order that answers the main question first:
# the four main methods, AutoAttack on the recommended recipe and the two baselines, then the
# ablations and the other baselines. Resumable: re-running skips finished cells.
# Usage: nohup bench/run_cpu_table.sh > bench/out/robust_cpu.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
main=(transform_ft prune_ft data_distill prune_distill)
"$py" bench/robust_table.py --profile cpu --methods "${main[@]}"
"$py" bench/robust_table.py --profile cpu --autoattack --methods data_distill transform_ft prune_ft
"$py" bench/robust_table.py --profile cpu --methods "${main[@]}" data_ft transform_distill sens_distill cstar uniform_ft
