# session 27, call 5 (no carry; c4's A/B cut to fit what was left of the device time): inductor's row reductions up
# to 2,048 elements persistent (`megamoe.model.compile.PERSISTENT_ROWS=2048`) against inductor's own heuristics (0,
# the code's default), forward+backward, 16 layers, mb 2, FP8 experts + FP8 projections with the weights cached,
# alternated in one process, two rounds of 6 timed steps, inductor's FX graph cache off.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; python3 -c "from torch._inductor import config; print('inductor_choices_class' in dir(config))"
cd bench
timeout $((175 - SECONDS)) python3 bench_ab.py megamoe.model.compile.PERSISTENT_ROWS=2048,0 torch._inductor.config.fx_graph_cache=False,False \
    --rounds 2 --warmup 2 --iters 6 --back-to-back --fp8-cache --set moe.expert_precision=fp8 model.attention_precision=fp8 \
    > $OUT/ab_rows_fp8.log 2>&1; echo "fp8 rc $?"; grep -E "round . mb|medians|rror" $OUT/ab_rows_fp8.log | tail -8; date -u
