# session 13, call 4 (H100): q, k, v as one product (attention.FUSED_QKV) against three, alternated in one
# process (forward+backward, 16 layers, mb 2, compiled); then, with the faster of the two, the trainer's
# full step at 8 layers (target 1) and the small MoE against its dense twin (target 4), alternated
export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
(cd bench && timeout 240 python3 bench_ab.py megamoe.model.attention.FUSED_QKV=True,False --rounds 2) > $OUT/ab.log 2>&1; echo "ab rc $?"
grep -E "median|first step|Error|error" $OUT/ab.log | head -30; date -u
best=$(python3 -c "
import json, statistics
rs = [json.loads(l) for l in open('$OUT/bench_ab.jsonl') if '\"system\"' in l]
m = {v: statistics.mean(r['median_ms'] for r in rs if r['system'].startswith('FUSED_QKV=' + v)) for v in ('True', 'False')}
print(min(m, key=m.get))")
echo "faster: FUSED_QKV=$best"; sed -i "s/^FUSED_QKV = True/FUSED_QKV = $best/" megamoe/model/attention.py
TAG=s13- COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 STEPS=20 timeout 110 bash bench/train_device.sh 8 2>&1 | grep -v "^name"; date -u
SMALL="model.d_model=512 model.n_heads=8 moe.ffn_hidden=256 data.seq_length=1024 train.micro_batch_size=32 train.global_batch_size=32"
for v in moe-1 dense moe-2; do extra="$SMALL"; [ $v = dense ] && extra="$SMALL moe.num_experts=0 moe.ffn_hidden=2048"
  TAG=s13-small-$v- EXTRA="$extra" COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 STEPS=30 timeout 100 bash bench/train_device.sh 8 2>&1 | grep -v "^name"; done; date -u
