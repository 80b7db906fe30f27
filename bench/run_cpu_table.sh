#!/usr/bin/env bash
# The CPU profile of bench/robust_table.py in the order that answers the main question first:
# the recommended recipe and the baselines, APGD-CE+T and the held-out and confirmation test images on them, the
# later candidates on the unseen training images, then the ablations and the other rows.
# Resumable: re-running skips finished cells (and finished attacks).
# Usage: nohup bench/run_cpu_table.sh > bench/out/robust_cpu.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
main=(hybrid_both both_data transform_ft prune_ft prune_both hybrid_staged hybrid_ft)  # five seeds (the profile's)
"$py" bench/robust_table.py --profile cpu --methods "${main[@]}"
"$py" bench/robust_table.py --profile cpu --autoattack --heldout --methods "${main[@]}"
# the confirmation images, kept for checking the choices the held-out images made: the recipe, the one it replaced
# and the baselines
"$py" bench/robust_table.py --profile cpu --confirm --methods hybrid_staged hybrid_both transform_ft prune_ft hybrid_ft
# the two candidates built after every test image had been used (gradual rank reduction; the recipe with
# sensitivity-weighted ranks), five seeds, judged against the recipe and the baselines on the unseen training images
"$py" bench/robust_table.py --profile cpu --methods gradual_both sens_staged
"$py" bench/robust_table.py --profile cpu --unseen --methods gradual_both sens_staged hybrid_staged transform_ft prune_ft
# a fine-tune twice as long for every method (same teachers, three seeds), judged on the fresh training images
long=(hybrid_staged prune_ft transform_ft)
"$py" bench/robust_table.py --profile cpu --ft-epochs 6 --seeds 0 1 2 --methods "${long[@]}"
"$py" bench/robust_table.py --profile cpu --ft-epochs 6 --seeds 0 1 2 --fresh --methods "${long[@]}"
# the levers and ablations: three seeds
"$py" bench/robust_table.py --profile cpu --seeds 0 1 2 --methods flops_data
"$py" bench/robust_table.py --profile cpu --seeds 0 1 2 --autoattack --heldout --methods flops_data
"$py" bench/robust_table.py --profile cpu --seeds 0 1 2 --methods data_ft data_distill flops_ft prune_distill \
  transform_distill sens_distill cstar uniform_ft sens_both
"$py" bench/robust_table.py --profile cpu --seeds 0 1 2 --heldout --methods data_ft flops_ft cstar data_distill \
  prune_distill sens_both
