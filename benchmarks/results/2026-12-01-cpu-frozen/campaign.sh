#!/usr/bin/env bash
# The CPU campaign of NOTES.md's ninth round: every case of issue 15, inference rows with frozen weights beside.
set -u
cd "$(dirname "$0")/../../.."
OUT=benchmarks/results/2026-12-01-cpu-frozen
INF=eager,compile,cpu,compile:cpu,frozen:cpu,compile-frozen,onnxruntime
run() { .venv/bin/python -m cct_kernels bench --no-progress --warmup 2 "$@" 2>&1 | grep -v "^    \|Warn"; }
run --model cct_14_7x2_224 --batch 1 --mode inference --backends $INF --min-time 12 --out $OUT/cct_14_7x2_224_b1
run --model cct_7_3x1_32 --batch 1 --mode inference --backends $INF --min-time 12 --out $OUT/cct_7_3x1_32_b1
run --model cct_7_3x1_32 --batch 64 --mode inference --backends $INF --min-time 12 --out $OUT/cct_7_3x1_32_b64
run --model cct_14_7x2_224 --batch 16 --mode inference --backends $INF --min-time 12 --out $OUT/cct_14_7x2_224_b16
run --model text_cct_6 --batch 64 --mode inference --backends $INF --min-time 12 --out $OUT/text_cct_6_b64
run --model cct_7_3x1_32 --batch 32 --mode train --backends eager,compile,cpu,compile:cpu --min-time 12 --out $OUT/cct_7_3x1_32_b32_train
