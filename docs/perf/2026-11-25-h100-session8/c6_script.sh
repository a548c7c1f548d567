export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 400 python3 -m pytest -q -p no:cacheprovider tests/test_loss.py tests/test_kernels.py tests/test_experts.py -k "cuda" 2>&1 | tail -4
TORCH_LOGS=graph_breaks timeout 100 python3 -c "
import torch
from megamoe.train import fused_cross_entropy as FC
x = torch.randn(64, 1000, device='cuda').bfloat16(); y = torch.randint(0, 1000, (64,), device='cuda')
print('compiled chunk ok', torch.compile(FC.chunk_loss, fullgraph=True)(x, y, False)[0].item())
" 2>&1 | tail -3
