# session 13, call 6 (H100), the final code: the trainer's full step at 8 layers (target 1); the small MoE
# against its dense twin (target 4), the MoE alternating the row-grouped products' TMA store (default) with
# masked stores (AB=masked: a sitecustomize sets grouped_gemm.ROWS_TMA_STORE = False in that process)
export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
mkdir -p /tmp/ab; printf 'import os\nif os.environ.get("AB") == "masked":\n    import megamoe.moe.grouped_gemm as G\n    G.ROWS_TMA_STORE = False\n    print("ROWS_TMA_STORE", G.ROWS_TMA_STORE, flush=True)\n' > /tmp/ab/sitecustomize.py
export PYTHONPATH=/tmp/ab:/tmp/site:$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
TAG=s13f- COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 STEPS=20 timeout 90 bash bench/train_device.sh 8 2>&1 | grep -v "^name"; date -u
SMALL="model.d_model=512 model.n_heads=8 moe.ffn_hidden=256 data.seq_length=1024 train.micro_batch_size=32 train.global_batch_size=32"
for v in moe-tma-1 moe-masked-1 dense moe-tma-2 moe-masked-2; do extra="$SMALL"; [ $v = dense ] && extra="$SMALL moe.num_experts=0 moe.ffn_hidden=2048"
  AB=${v#moe-}; AB=${AB%-*}; AB=$AB TAG=s13f-small-$v- EXTRA="$extra" COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 STEPS=30 timeout 60 bash bench/train_device.sh 8 2>&1 | grep -v "^name"
  grep -h ROWS_TMA_STORE $OUT/s13f-small-$v-L8-compile.log | head -1; done; date -u
cd $OUT && tar czf c6_logs.tgz *.log *.jsonl device.txt && rm -f *.log *.jsonl && ls
