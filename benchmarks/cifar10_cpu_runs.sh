#!/bin/bash
# CPU-scale CIFAR-10 reproduction (issue 11): every training run and evaluation behind the numbers in
# benchmarks/RESULTS.md ("CIFAR-10 reproduction at CPU scale"). Re-runnable in pieces: a finished run
# (model.safetensors) is skipped, an interrupted one (resume.safetensors; Ctrl-C, kill, end of a
# session) continues with --resume; so run the script again until everything is done (~2 h pieces).
# Usage:  D=~/data/cifar-10-batches-py OUT=runs bash benchmarks/cifar10_cpu_runs.sh
set -euo pipefail
D=${D:?set D to the cifar-10-batches-py directory}
OUT=${OUT:-runs}
C=$(cd "$(dirname "$0")/.." && pwd)/configs/cpu
T="--threads ${THREADS:-2}"
mkdir -p "$OUT"

train() {  # OUT_DIR ARGS...: skip a finished run, resume an interrupted one, else start it
  local out=$1
  shift
  if [ -f "$out/model.safetensors" ]; then echo "finished: $out"; return; fi
  local resume=""
  [ -f "$out/resume.safetensors" ] && resume="--resume"
  ddi-hw train "$@" --data-dir "$D" --out "$out" $T $resume
}

# Stage 0: static backbones with one short-schedule recipe (30 epochs, Nesterov, warm-up + cosine, label
# smoothing, wd 5e-4, channels-last). ResNet-38 is the IADI start; 14/20/26 are Table II's baselines.
for n in 38 20 14 26; do
  train "$OUT/resnet${n}_static" --config $C/resnet${n}_static.yaml
done

# IADI (MGL2S) on ResNet-38, one recipe and one alpha setting (dual rule) for every target.
iadi() {  # name resource target
  train "$OUT/$1" --config $C/resnet38_iadi.yaml --init "$OUT/resnet38_static" --resource $2 \
    --hardware zedboard --target-saving $3
}
iadi iadi_flops50 flops 0.5
iadi iadi_energy50 energy 0.5
for t in 30 40 60 70 80; do iadi iadi_flops$t flops 0.$t; done

# DDI: exits added to the 50 % IADI model, trained on L_o + sum_i L_i (+ alpha E, same dual rule)
train "$OUT/ddi" --config $C/resnet38_ddi.yaml --init "$OUT/iadi_flops50"

# Evaluation: accuracy vs FLOPs/energy, budgets at the static baselines' costs (Table II), Table I
ddi-hw eval "$OUT"/resnet{14,20,26,38}_static "$OUT"/iadi_* "$OUT/ddi" --data-dir "$D" --hardware zedboard --out "$OUT/eval"
ddi-hw table1 "$OUT/eval/summary.csv" --out "$OUT/table1"
