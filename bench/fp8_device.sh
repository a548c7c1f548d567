#!/bin/bash
# Issue 9, target 2, in one device call: the CUDA tests of the expert GEMMs (bf16 grouped GEMM and
# FP8 kernels against the CPU path), then forward+backward of OLMoE-1B-7B (16 layers, micro-batch 2)
# for megamoe compiled in bf16 and with moe.expert_precision=fp8, then the peers (torchtitan,
# OLMo-core) on the same GPU. Needs .whl (deepspeed) and .peers carried. Logs in $OUT.
#   usage: bash bench/fp8_device.sh
export PYTHONUNBUFFERED=1 OUT=${OUT:-bench_out}
mkdir -p $OUT
python3 -m pytest -q -p no:cacheprovider tests/test_experts.py 2>&1 | tail -3 | tee $OUT/cuda_tests.log
python3 bench/bench_model.py --mb 2 --systems megamoe-compile,megamoe-compile-fp8 2>&1 \
    | grep -v '^{' | tee $OUT/bench_model_fp8.log
OUT=$OUT/peers bash .peers/run.sh --mbs 2 --runs torchtitan:sdpa_compile,olmo_core:v2_compile 2>&1 | tee $OUT/peers.log
