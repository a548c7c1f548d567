export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
PYTHONPATH=/tmp/site:$PWD timeout 150 python3 bench/bench_permute.py --sweep 2>&1 | tail -40
cat > /tmp/codecheck.py <<'PY'
import time, torch
from megamoe.moe import fused_permute as P
x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16); i = torch.randint(0, 64, (512,), device="cuda")
f = torch.compile(lambda x, i: P.gather_rows(x * 2, i) + 1)
f(x, i); torch.cuda.synchronize()
for name, fn in (("eager op", lambda: P.gather_rows(x, i)), ("compiled fn", lambda: f(x, i)), ("torch index", lambda: x[i])):
    for _ in range(50): fn()
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(2000): fn()
    torch.cuda.synchronize(); print(f"host per call {name}: {(time.perf_counter() - t0) / 2000 * 1e6:.1f} us")
PY
cd /tmp && TORCH_LOGS=output_code PYTHONPATH=/tmp/site:$OLDPWD timeout 100 python3 /tmp/codecheck.py > $OUT/codecheck.log 2>&1; grep -E "host per call|gather_kernel|gather_rows" $OUT/codecheck.log | head -20; cd $OLDPWD
for v in base new; do P=$PWD; [ $v = base ] && P=$PWD/.base
  mkdir -p $OUT/$v; OUT=$OUT/$v PYTHONPATH=/tmp/site:$P timeout 200 python3 bench/bench_model.py --mb 2 --systems megamoe-compile --profile > $OUT/$v/log 2>&1; grep median $OUT/$v/log | head -1; head -1 $OUT/$v/profile_megamoe-compile.txt; head -2 $OUT/$v/gaps_megamoe-compile.txt
done
