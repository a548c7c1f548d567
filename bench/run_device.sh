#!/bin/bash
# The benchmarks of docs/performance.md in one device call; logs land in $OUT (or ./bench_out).
# usage: bash bench/run_device.sh [extra bench_model.py args]
export PYTHONUNBUFFERED=1 OUT=${OUT:-bench_out}
mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee $OUT/device.txt
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" 2>&1 | tee -a $OUT/device.txt
python3 bench/bench_moe_layer.py 2>&1 | grep -v '^{' | tee $OUT/moe_layer.log
python3 bench/bench_model.py "$@" 2>&1 | tee $OUT/model.log
