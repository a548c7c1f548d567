# session 15, call 2 (c1's machine if warm): inductor's programmatic dependent launch and mix-order reduction,
# alternated in one process (forward+backward, 16 layers, mb 2, compiled): (pdl, mix) = (off, default),
# (on, default), (off, off), two rounds; then the trainer at 8 layers (target 1) and the small MoE against
# its dense twin (target 4), c6_script.sh of session 14 as is
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout 80 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "residual_add_is_the_blocks_on_cuda" 2>&1 | tail -1
python3 -c "import torch._inductor.config as c; print('defaults: pdl', c.triton.enable_pdl, 'mix', getattr(c.triton, 'mix_order_reduction', None))"
(cd bench && PYTHONPATH=$PWD/.. timeout 330 python3 bench_ab.py torch._inductor.config.triton.enable_pdl=False,True,False torch._inductor.config.triton.mix_order_reduction=True,True,False --rounds 2) > $OUT/ab.log 2>&1; echo "ab rc $?"
grep -E "medians|first step|Error|error" $OUT/ab.log | head -20; date -u
export PYTHONPATH=/tmp/site:$PWD
TAG=s15c2- COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 STEPS=20 timeout 90 bash bench/train_device.sh 8 2>&1 | grep -v "^name"
SMALL="model.d_model=512 model.n_heads=8 moe.ffn_hidden=256 data.seq_length=1024 train.micro_batch_size=32 train.global_batch_size=32"
for v in moe dense; do extra="$SMALL"; [ $v = dense ] && extra="$SMALL moe.num_experts=0 moe.ffn_hidden=2048"; TAG=s15c2-small-$v- EXTRA="$extra" COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 STEPS=30 timeout 50 bash bench/train_device.sh 8 2>&1 | grep -v "^name"; done; date -u; cd $OUT && tar czf c2_logs.tgz s15c2-* && rm -f s15c2-*
