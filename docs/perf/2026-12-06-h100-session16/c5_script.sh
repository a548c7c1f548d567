# session 16, call 5: the final code (a6b9d4a): c2_script.sh as is: forward+backward 16 layers mb 2 compiled,
# timed back to back (as the peers benchmark times theirs) and waiting for each step, then the peers
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
for m in b2b sync b2b2; do flag=""; [ $m != sync ] && flag=--back-to-back
  mkdir -p $OUT/fb_$m; OUT=$OUT/fb_$m timeout 110 python3 bench/bench_model.py --systems megamoe-compile --mb 2 --iters 20 $flag > $OUT/fb_$m.log 2>&1; echo "fb $m rc $?"
  grep -E "median|failed|Error" $OUT/fb_$m.log | head -2; done; date -u
OUT=$OUT/peers BENCH_DEADLINE_S=180 timeout 200 bash .peers/run.sh --mbs 2 --runs torchtitan:sdpa_compile,olmo_core:v2_compile; date -u
