export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/site:$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
TAG=h200-s11- COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 STEPS=12 bash bench/train_device.sh 16 2>&1 | grep -v "^name"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
