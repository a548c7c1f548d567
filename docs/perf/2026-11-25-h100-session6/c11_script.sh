export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
cat > /tmp/ce.py <<'PY'
import statistics, sys, torch
import megamoe.train.loss as L
name = sys.argv[1]
n, V = 10672, 50304
g = torch.Generator(device="cuda").manual_seed(0)
x = (torch.randn(n, V, device="cuda", generator=g) * 3).to(torch.bfloat16)
y = torch.randint(0, V, (n,), device="cuda", generator=g); y[::7] = -100
f = torch.compile(L._chunk_loss, dynamic=False)
for _ in range(3): f(x, y, True)
torch.cuda.synchronize(); ts = []
for _ in range(20):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True); a.record(); out = f(x, y, True); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
torch.save([t.cpu() for t in out], f"/tmp/ce_{name}.pt")
print(name, L.__file__, "chunk [10672, 50304] bf16 loss+grad compiled: median ms", round(statistics.median(ts), 3))
if name == "new":
    b, n_ = torch.load("/tmp/ce_base.pt"), [t for t in out]
    print("loss rel diff", float((n_[0].cpu() - b[0]).abs() / b[0].abs()), "grad max abs diff", float((n_[1].cpu().float() - b[1].float()).abs().max()))
PY
R=$PWD
(cd /tmp && PYTHONPATH=/tmp/site:$R/.base python3 /tmp/ce.py base 2>&1 | tail -1; PYTHONPATH=/tmp/site:$R python3 /tmp/ce.py new 2>&1 | tail -2)
S="model.d_model=512 model.n_heads=8 moe.ffn_hidden=256 model.n_layers=8"
for v in new base new base; do
  P=$PWD; [ $v = base ] && P=$PWD/.base
  mkdir -p $OUT/$v-small; OUT=$OUT/$v-small PYTHONPATH=/tmp/site:$P timeout 120 python3 bench/bench_model.py --seq 1024 --mb 32 --systems megamoe-compile --set $S 2>&1 | grep "median" | sed "s/^/$v small /"
done
