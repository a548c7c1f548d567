export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/site:$PWD
date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
TAG=s8c8-offload- EXTRA="optim.offload=cpu train.global_batch_size=16" STEPS=8 COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 timeout 540 bash bench/train_device.sh 16 2>&1 | grep -v "^name\|^NVIDIA"
date -u
