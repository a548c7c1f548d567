"""Dropless top-k dispatch's sort by expert as a two-kernel stable counting sort on CUDA.

    sort_by_expert(expert_idx [N], expert_load [E], k) -> order, inverse, token_of_row   (int64 [N] each)
        order        = argsort(expert_idx, stable=True)   the assignment in each sorted row
        inverse[i]   = the row holding assignment i        (order's inverse)
        token_of_row = order // k                          (token_idx[order] for token-major top-k)

The torch form is a cub radix sort of the expert ids (narrowed to one byte by `dispatch.sort_keys`:
the cast, cub's kernels and their memsets), then a gather, an arange and a scatter: a handful of
small launches a layer, each mostly launch latency at dispatch's sizes. Here, with BLOCK assignments
a program:
  1. histogram: each program counts its block's assignments per expert (a one-hot [SUB, E_P2] tile
     summed over its rows, SUB rows at a time; no atomics) into hist[block, E_P2];
  2. scatter: each program adds up the histograms of the blocks before its own plus each expert's
     start row (an exclusive cumsum of expert_load), then walks its block SUB rows at a time: a cumsum
     of the one-hot tile down its rows ranks each assignment among its expert's earlier ones, so
     row = base[expert] + rank, and writes inverse, order and token_of_row.
Two launches, no host sync, the exact stable order (ties by assignment index), hence the same int64
tensors as the torch form bit for bit. Stage 2's sum over earlier blocks reads B·E_P2 counters at
most (B = N / BLOCK): 128 × 64 at 65,536 assignments and 64 experts. On an H100 (session 14) the
three tensors took 26 µs against the torch form's 46 at OLMoE-1B-7B's 65,536 assignments a layer,
50 against 55 at the small model's 262,144. Checked against the torch form under Triton's
interpreter on the CPU (tests/test_kernels.py) and on the GPU (the CUDA test there). E above MAX_EXPERTS would not fit the tile: dispatch keeps the
torch form there, and on CPU and for routings that are not top-k.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: dispatch uses the torch form
    triton = None

# A program's one-hot tile is SUB × E_P2 = TILE["elements"] (256 × 64, ..., 16 × 1024) and its block
# BLOCK assignments. The fastest of a sweep on an H100 (blocks of 512-4,096, tiles of 8,192-16,384,
# 4 or 8 warps; docs/performance.md, session 14): 26.0 µs against the torch form's 46.3 at 65,536
# assignments and 64 experts, 50.4 against 54.6 at 262,144; larger blocks were slower at both sizes.
TILE = {"elements": 16384, "block": 512, "num_warps": 4}
MAX_EXPERTS = 1024
ENABLED = True  # False: dispatch sorts with torch on CUDA too (for A/B runs)


# Triton compiles kernels for the GPU (not its interpreter, which would run them on the host). Read once:
# torch.compile cannot trace Triton's getenv, and reading it in `available` split every compiled MoE
# block in two at dispatch (session 14's c1 profile: the host reached the second part late)
_COMPILES = triton is not None and not triton.knobs.runtime.interpret


def available(x: torch.Tensor) -> bool:
    return ENABLED and _COMPILES and x.is_cuda


def _shape(num_experts: int) -> tuple[int, int]:
    """(E_P2, SUB): the one-hot tile's columns and rows."""
    e_p2 = triton.next_power_of_2(num_experts)
    return e_p2, min(TILE["block"], TILE["elements"] // e_p2)


if triton is not None:
    @triton.jit
    def _histogram_kernel(expert_ptr, hist_ptr, n, BLOCK: tl.constexpr, SUB: tl.constexpr, E_P2: tl.constexpr):
        pid = tl.program_id(0)
        experts = tl.arange(0, E_P2)
        counts = tl.zeros([E_P2], dtype=tl.int32)
        for s in range(0, BLOCK, SUB):
            i = pid.to(tl.int64) * BLOCK + s + tl.arange(0, SUB)
            e = tl.load(expert_ptr + i, mask=i < n, other=-1)  # -1: past the end matches no expert
            counts += tl.sum((e[:, None] == experts[None, :]).to(tl.int32), 0)
        tl.store(hist_ptr + pid * E_P2 + experts, counts)

    @triton.jit
    def _scatter_kernel(expert_ptr, load_ptr, hist_ptr, order_ptr, inverse_ptr, token_ptr, n, k, num_experts,
                        BLOCK: tl.constexpr, SUB: tl.constexpr, E_P2: tl.constexpr):
        pid = tl.program_id(0)
        experts = tl.arange(0, E_P2)
        load = tl.load(load_ptr + experts, mask=experts < num_experts, other=0).to(tl.int32)
        nxt = tl.cumsum(load, 0) - load  # [E_P2] the next free row of each expert: its start row ...
        for r in range(0, pid, SUB):  # ... after the rows of the blocks before this one
            blocks = r + tl.arange(0, SUB)
            nxt += tl.sum(tl.load(hist_ptr + blocks[:, None] * E_P2 + experts[None, :],
                                  mask=(blocks < pid)[:, None], other=0), 0)
        for s in range(0, BLOCK, SUB):
            i = pid.to(tl.int64) * BLOCK + s + tl.arange(0, SUB)
            ok = i < n
            e = tl.load(expert_ptr + i, mask=ok, other=-1)
            hot = (e[:, None] == experts[None, :]).to(tl.int32)  # [SUB, E_P2]
            # inclusive cumsum down the rows: 1 + the expert's earlier assignments in these SUB
            row = tl.sum(hot * (nxt[None, :] + tl.cumsum(hot, 0) - 1), 1).to(tl.int64)
            nxt += tl.sum(hot, 0)
            tl.store(inverse_ptr + i, row, mask=ok)
            tl.store(order_ptr + row, i, mask=ok)
            tl.store(token_ptr + row, i // k, mask=ok)

    def launch_sort(expert_idx: torch.Tensor, expert_load: torch.Tensor, k: int,
                    wrap=lambda kernel: kernel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`wrap` is torch.compile's `wrap_triton` under the custom op, the plain kernel otherwise.
        expert_load must count expert_idx (dispatch's group sizes: Routing.expert_load)."""
        expert_idx, expert_load = expert_idx.contiguous(), expert_load.contiguous()
        n, num_experts = expert_idx.numel(), expert_load.numel()
        order, inverse, token_of_row = (torch.empty(n, dtype=torch.int64, device=expert_idx.device)
                                        for _ in range(3))
        if n:
            e_p2, sub = _shape(num_experts)
            block, warps = TILE["block"], TILE["num_warps"]
            grid = (triton.cdiv(n, block),)
            hist = torch.empty(grid[0], e_p2, dtype=torch.int32, device=expert_idx.device)
            wrap(_histogram_kernel)[grid](expert_idx, hist, n, BLOCK=block, SUB=sub, E_P2=e_p2, num_warps=warps)
            wrap(_scatter_kernel)[grid](expert_idx, expert_load, hist, order, inverse, token_of_row, n, k,
                                        num_experts, BLOCK=block, SUB=sub, E_P2=e_p2, num_warps=warps)
        return order, inverse, token_of_row

    @torch.library.triton_op("megamoe::sort_by_expert", mutates_args=())
    def _sort_by_expert(expert_idx: torch.Tensor, expert_load: torch.Tensor,
                        k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return launch_sort(expert_idx, expert_load, k, torch.library.wrap_triton)


def sort_by_expert(expert_idx: torch.Tensor, expert_load: torch.Tensor,
                   k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order, inverse, token_of_row) of token-major top-k assignments sorted stably by expert, for
    expert_idx [N = T·k] and its counts expert_load [E ≤ MAX_EXPERTS]. Compiled code calls the custom
    op; eager code launches the kernels itself, as `fused_permute` does."""
    if torch.compiler.is_compiling():
        return torch.ops.megamoe.sort_by_expert(expert_idx, expert_load, k)
    return launch_sort(expert_idx, expert_load, k)
