# session 27, call 4 (no carry): inductor's row reductions up to 2,048 elements kept persistent
# (`megamoe.model.compile.PERSISTENT_ROWS`: 2048, or 0 = inductor's own heuristics, 1,024, the code's default) against
# each other, forward+backward, 16 layers, mb 2, alternated in one process, two rounds, inductor's FX graph cache off
# (the two arms must not share compiled code): FP8 experts + FP8 projections with the weights cached (profile of the
# 2048 arm), then bf16 as time allows.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "from torch._inductor import config; print('inductor_choices_class' in dir(config))"
cd bench
timeout $((250 - SECONDS)) python3 bench_ab.py megamoe.model.compile.PERSISTENT_ROWS=2048,0 torch._inductor.config.fx_graph_cache=False,False \
    --rounds 2 --back-to-back --fp8-cache --set moe.expert_precision=fp8 model.attention_precision=fp8 --profile > $OUT/ab_rows_fp8.log 2>&1
echo "fp8 rc $?"; grep -E "medians|rror" $OUT/ab_rows_fp8.log | tail -4; date -u
left=$((300 - SECONDS)); [ $left -ge 100 ] && timeout $left python3 bench_ab.py megamoe.model.compile.PERSISTENT_ROWS=0,2048 \
    torch._inductor.config.fx_graph_cache=False,False --rounds 2 --back-to-back > $OUT/ab_rows_bf16.log 2>&1
grep -E "medians|rror" $OUT/ab_rows_bf16.log 2>/dev/null | tail -4; date -u
grep -c "triton_per" $OUT/profile_ab_2048_False.txt 2>/dev/null; grep -E "triton_(per|red)" $OUT/profile_ab_2048_False.txt 2>/dev/null | head -12 | cut -c1-160
