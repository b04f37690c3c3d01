#!/bin/bash
# CPU-scale CIFAR-10 reproduction: every training run and evaluation behind the numbers in
# benchmarks/RESULTS.md ("CIFAR-10 reproduction at CPU scale"). On the 2-core machine the runs were
# split into two streams of one thread each (--threads 1; set THREADS=0 for all cores per run).
# Usage:  D=~/data/cifar-10-batches-py OUT=runs bash benchmarks/cifar10_cpu_runs.sh
set -euo pipefail
D=${D:?set D to the cifar-10-batches-py directory}
OUT=${OUT:-runs}
C=$(cd "$(dirname "$0")/.." && pwd)/configs/cpu
T="--threads ${THREADS:-1}"
mkdir -p "$OUT"

# Stage 0: static backbones (ResNet-38 is the IADI start; 14/20/26 are Table II's baselines), 3000 steps each
for n in 38 14 20 26; do
  ddi-hw train --config $C/resnet${n}_static.yaml --data-dir "$D" --out "$OUT/resnet${n}_static" $T
done

# IADI (MGL2S) on ResNet-38: FLOPs targets 0.3-0.8 (Table I family and issue targets), energy target 0.5
iadi() {  # name resource target steps alpha
  ddi-hw train --config $C/resnet38_iadi.yaml --init "$OUT/resnet38_static" --data-dir "$D" --out "$OUT/$1" \
    --resource $2 --hardware zedboard --target-saving $3 --steps $4 --alpha $5 $T
}
iadi iadi_flops50 flops 0.5 1000 0.5
iadi iadi_energy50 energy 0.5 600 0.5
iadi iadi_flops30 flops 0.3 600 0.5
iadi iadi_flops70 flops 0.7 600 0.5
iadi iadi_flops40 flops 0.4 600 0.5
iadi iadi_flops60 flops 0.6 600 1.0   # larger alpha: the gates reach a high target sooner
iadi iadi_flops80 flops 0.8 600 1.5

# DDI: exits added to the 50 % IADI model, trained on L_o + sum_i L_i (+ alpha E)
ddi-hw train --config $C/resnet38_ddi.yaml --init "$OUT/iadi_flops50" --data-dir "$D" --out "$OUT/ddi" --steps 400 $T

# Evaluation: accuracy vs FLOPs/energy, budgets at the static baselines' costs (Table II), Table I
ddi-hw eval "$OUT"/resnet{14,20,26,38}_static "$OUT"/iadi_* "$OUT/ddi" --data-dir "$D" --hardware zedboard --out "$OUT/eval"
ddi-hw table1 "$OUT/eval/summary.csv" --out "$OUT/table1"
