"""Expert grouped GEMMs as persistent Triton kernels with TMA loads and stores (Hopper and later).

    rows_mm(a, b, offs, trans_b=False)   out[r] = a[r] @ b[e(r)]        b [E, K, N]; trans_b: b [E, N, K], its transpose used
    weight_grad_mm(a, b, offs)           out[e] = Σ_{r in e} a[r]ᵀ b[r]  [E, M, N]
    linear(x, w, offs)                   x @ w[e(r)] per row, forward and backward through the two above
    gathered_linear(x, w, offs, index, inverse, k)   the same for x[index] (token rows read in place)

`a_index` / `b_index` (rows_mm, weight_grad_mm): row r of the operand is its tensor's row index[r], read by
pointer loads through the index instead of from a gathered copy (Hopper's TMA cannot gather rows).

`offs` [E] int32 holds each expert's end row (as `torch._grouped_mm`); rows are sorted by expert.
`torch._grouped_mm` runs one CUTLASS configuration for every shape; these kernels ran each of the
six expert products of OLMoE-1B-7B and of the small model 4-10% faster on an H100
(docs/performance.md, session 9).

How: one program per SM walks the output tiles (persistent). Operands arrive by TMA, through
descriptors each program builds once over the whole tensor. In the row-grouped product a tile of
rows may run past its expert's end into the next expert's rows: they only feed output rows that
the masked store leaves alone. The weight gradient sums over an expert's rows and must not see the
next expert's, so it loads through *ragged* descriptors (the construction of
`triton.tools.ragged_tma`): two leading dimensions whose strides wrap around the 64-bit address
space make the hardware read zeros past the expert's last row; the row-grouped product stores its
tiles through the same kind of descriptor, so that the copy engine drops rows past the expert's end.
The tile → expert map is built in the kernel from `offs` (no row count reaches the host). Both
accumulate in fp32 and round once. The weight gradient deals its tiles longest expert first, each
round of programs in the direction opposite to the last (`LONGEST_FIRST`): a tile's program sums all
of its expert's rows, and taken expert after expert the busiest expert's tiles were the tail. Where an
expert's output tiles are few (the small model), an expert far past the mean would keep a few programs
busy long after the rest: the weight gradient then cuts it into pieces (`wgrad_cut`), writes each piece's
fp32 tiles apart and sums them in order in a second kernel (deterministic), taking the largest items first.

Where the kernels do not apply (CPU, no Triton, before Hopper, shapes off the tiles, other dtypes,
`MEGAMOE_GROUPED_GEMM=torch`) the same products run through `torch._grouped_mm`. Under
torch.compile the kernels are `triton_op`s (inductor launches them from its own code); eager code
launches them directly. Triton's interpreter checks them against a torch loop in CI.
"""

import os

import torch

from . import fused_permute

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: torch's grouped GEMM
    triton = None

BIG = 0x40000000  # 2**30: the ragged descriptor's row extent
# (BM, BN, BK, warps, stages, the output's column slices); warp specialisation off
WGRAD_CONFIG = (128, 256, 64, 8, 3, 2)
# The weight gradient's stages where an operand's rows are read through the row index. The index's load takes
# a stage of Triton's pipeline ahead of the rows it addresses: at three stages (WGRAD_CONFIG's) the gathering
# forms keep two buffers an operand and wait for every copy in flight at each k-step; at five, three buffers an
# operand as the TMA form's three stages keep, in the same shared memory (181 KB; sm_90 TTGIR, Triton 3.6).
# Timed (H100, docs/performance.md session 20): five against three, the small MoE's forward+backward with the
# rows read in place 39.78 / 39.89 ms against 40.76 / 40.93; OLMoE's w1 gradient gathering 1.079 ms against
# 1.471 (its TMA form on a gathered copy: 0.864, which OLMoE's default path runs).
WGRAD_GATHER_STAGES = 5


def rows_config(k: int, n: int, trans_b: bool) -> tuple[tuple[int, ...], bool]:
    """(BM, BN, BK, warps, stages) and warp specialisation for a [R, k] × [k, n] row-grouped product:
    the fastest of `bench_grouped_gemm.py --tma`'s sweep on OLMoE's and the small model's shapes
    (H100, docs/performance.md session 9): 128×256×64 tiles; three stages for long reductions, four
    for short ones; warp specialisation only for the input gradient of a wide first projection. One
    persistent program an SM: two an SM on 128×128×64 tiles at two stages (one's epilogue beside the
    other's main loop) made both models slower (H100, docs/performance.md session 22)."""
    if trans_b and n >= 2048 and k >= 2048:
        return (128, 256, 64, 8, 4), True
    return (128, 256, 64, 8, 3 if k >= 2048 else 4), False


# The FP8 row-grouped product (`scaled_rows_mm`): (BM, BN, BK, warps, stages); four stages where the
# reduction or the output is at most 1024 wide (`scaled_rows_config`)
SCALED_ROWS_CONFIG = (128, 256, 128, 8, 3)
# FP8 experts' products through this module's kernel (True) or `torch._scaled_grouped_mm` (False, for A/B runs)
FP8_KERNEL = True


def scaled_rows_config(k: int, n: int) -> tuple[tuple[int, ...], bool]:
    """(BM, BN, BK, warps, stages) and warp specialisation of an e4m3 [R, k] × [k, n] row-grouped product:
    the fastest of `bench_grouped_gemm.py --fp8`'s sweep on OLMoE's four products (H100, docs/performance.md
    session 24): 128×256×128 tiles, three stages at k = n = 2048 (the first projection's two products), four
    where either is 1024 (the second's: 3.4% and 1.5% faster than three); warp specialisation gained ≤ 1%."""
    bm, bn, bk, warps, stages = SCALED_ROWS_CONFIG
    return (bm, bn, bk, warps, stages if min(k, n) > 1024 else stages + 1), False


CHOICES = ("triton", "torch")


def check_environment() -> None:
    """Refuses a `MEGAMOE_GROUPED_GEMM` other than triton or torch (the trainer calls it at start)."""
    value = os.environ.get("MEGAMOE_GROUPED_GEMM", "triton")
    if value not in CHOICES:
        from ..config import ConfigError
        raise ConfigError(f"MEGAMOE_GROUPED_GEMM={value!r} is not a choice: set it to triton (the default: "
                          "megamoe's kernels on Hopper) or torch (torch._grouped_mm), or unset it")


def enabled() -> bool:
    return triton is not None and os.environ.get("MEGAMOE_GROUPED_GEMM", "triton") != "torch"


@torch.compiler.assume_constant_result
def _hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def _on_hopper(t: torch.Tensor) -> bool:
    return t.is_cuda and _hopper(t.device.index if t.device.index is not None else torch.cuda.current_device())


def rows_available(a: torch.Tensor, b: torch.Tensor, trans_b: bool = False) -> bool:
    """The kernel runs a [R, K] × b: bf16 on Hopper or later, K and N multiples of the tile."""
    k, n = (b.shape[2], b.shape[1]) if trans_b else (b.shape[1], b.shape[2])
    return enabled() and a.dtype == b.dtype == torch.bfloat16 and k % 64 == 0 and n % 256 == 0 and _on_hopper(a)


def scaled_rows_available(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The kernel runs e4m3 a [R, K] × b [E, N, K]ᵀ: on Hopper or later, K and N multiples of the tile."""
    bk, bn = SCALED_ROWS_CONFIG[2], SCALED_ROWS_CONFIG[1]
    return (enabled() and FP8_KERNEL and a.dtype == b.dtype == torch.float8_e4m3fn and a.shape[1] % bk == 0
            and b.shape[1] % bn == 0 and _on_hopper(a))


def wgrad_available(a: torch.Tensor, b: torch.Tensor) -> bool:
    bm, bn = WGRAD_CONFIG[:2]
    return (enabled() and a.dtype == b.dtype == torch.bfloat16 and a.shape[1] % bm == 0
            and b.shape[1] % bn == 0 and _on_hopper(a))


# The weight gradient's pieces of long experts: at most this many bytes of fp32 partial tiles a call
PIECES_BUDGET = 128 << 20
CUT_LARGE_EXPERTS = True  # False: one program per output tile for all of its expert's rows (for A/B runs)
# The weight gradient's uncut schedule: tiles of the longest experts first, dealt back and forth (True),
# or expert after expert in turn (False, for A/B runs). One tile's program sums all of its expert's
# rows, so with OLMoE's w2 (64 tiles an expert, 132 programs) the programs holding the busiest
# expert's tiles ran ~27% past the rest at a model's routing (a schedule model, session 13).
LONGEST_FIRST = True
# The weight gradient's uncut schedule as one flat loop over each program's k-steps (True), or a loop over
# its tiles with each tile's k-steps inside (False). Triton flattens a nested loop for its pipeliner only
# where the inner bounds do not change with the outer loop; a tile's k-steps follow its expert's rows, so
# the nested form (compiled for sm_90: two `scf.for`) starts the load pipeline again at every tile and
# waits for a tile's stores before the next tile's first loads; the flat form (one `scf.for`, as the
# row-grouped products compile) does not. H100, session 16 (c1): OLMoE's w1 / w2 weight gradients 0.883 /
# 0.443 ms flat against 0.928 / 0.474 nested at random top-8 loads (the small model's: equal); the model's
# forward+backward 133.84 / 134.22 ms against 134.67 / 135.16 (`bench_ab.py WGRAD_FLAT=False,True`).
WGRAD_FLAT = True
# The row-grouped product's output tiles leave by TMA through a ragged descriptor (True: asynchronous,
# rows past the expert's end dropped by the copy engine), or by masked stores from registers (False)
ROWS_TMA_STORE = True


def wgrad_cut(rows: int, experts: int, m: int, n: int, tiles: int, bk: int, programs: int) -> tuple[int, int]:
    """(cut, piece) for the weight gradient of `rows` rows of [m]- and [n]-wide operands, `tiles`
    output tiles an expert: experts longer than `cut` rows are cut into pieces of `piece` rows
    (a multiple of `bk`); (0, 0): none. One tile's program runs all of its piece's rows, so routing
    that sends 8× the mean load to one expert (a fresh router on the small model: session 10's c8)
    made that expert's tiles the schedule's tail. Cut: past half a program's fair share of the
    work (rows · tiles / programs) and 1.5× the mean (uniform routing cuts nothing); pieces of a
    quarter of the share, longer where the fp32 partials (fewer than rows / piece + rows / cut of
    [m, n]) would pass PIECES_BUDGET. None where the cut would be over an eighth of the rows (top-8
    routing gives no expert more): OLMoE's 64-128 tiles an expert spread any load already."""
    if not CUT_LARGE_EXPERTS:
        return 0, 0
    share = rows * tiles / programs
    cut = int(max(share / 2, 1.5 * rows / experts))
    room = PIECES_BUDGET // (m * n * 4) - -(-rows // max(cut, 1))  # partial tiles left for the pieces
    if 8 * cut > rows or room <= 0:
        return 0, 0
    piece = -(-max(int(share / 4), -(-rows // room), bk) // bk) * bk
    return max(cut, piece), piece  # an expert of one piece is not cut


if triton is not None:
    _BIG = tl.constexpr(BIG)

    @triton.jit
    def _ragged_descriptor(ptr, COLS: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
        """A descriptor over a row-major [rows, COLS] tensor whose `_ragged_load` clips to a run of
        rows: two leading dimensions whose strides (2**34 - COLS and COLS elements) add up to zero
        modulo 2**64, taken 2**30 and start + rows times; the row coordinate 2**30 - rows + r then
        runs past the descriptor's 2**30 rows exactly when r ≥ rows (`triton.tools.ragged_tma`)."""
        return tl.make_tensor_descriptor(ptr, shape=[0x7FFF0000, 0x7FFF0000, _BIG, COLS],
                                         strides=[2**34 - COLS, COLS, COLS, 1], block_shape=[1, 1, BR, BC])

    @triton.jit
    def _ragged_load(desc, start, rows, row, col, BR: tl.constexpr, BC: tl.constexpr):
        """[BR, BC] at rows start + row.. and columns col.., zeros at and past row start + rows."""
        return tl.reshape(desc.load([_BIG, start + rows, _BIG - rows + row, col]), [BR, BC])

    @triton.jit
    def _groups(offs_ptr, E: tl.constexpr, E_P2: tl.constexpr):
        """Per expert (a [E_P2] vector, zeros past E): its index, first row and end row."""
        es = tl.arange(0, E_P2)
        gend = tl.load(offs_ptr + es, mask=es < E, other=0)
        gstart = tl.load(offs_ptr + es - 1, mask=(es > 0) & (es < E), other=0)
        return es, gstart, gend

    @triton.jit
    def _ahead(size, es):
        """[E_P2, E_P2]: [e, f] when f comes before e, longest first (ties: lower expert first)."""
        return (size[None, :] > size[:, None]) | ((size[None, :] == size[:, None]) & (es[None, :] < es[:, None]))

    @triton.jit
    def _halves(out, BM: tl.constexpr, BN: tl.constexpr):
        """A [BM, BN] tile's two [BM, BN / 2] column halves (stores through half-width buffers). One store of
        the whole tile, where its buffer fits beside three load stages, was slower in the model (H100, session 17:
        docs/performance.md)."""
        return tl.split(tl.reshape(out, (BM, 2, BN // 2)).permute(0, 2, 1))

    @triton.jit
    def _ragged_store(desc, start, rows, row, col, data, BR: tl.constexpr, BC: tl.constexpr):
        """Stores [BR, BC] at rows start + row.. and columns col.., dropping rows at and past start + rows."""
        desc.store([_BIG, start + rows, _BIG - rows + row, col], tl.reshape(data, [1, 1, BR, BC]))

    @triton.jit
    def _rows_mm_kernel(a_ptr, b_ptr, c_ptr, offs_ptr, index_ptr, a_scale_ptr, b_scale_ptr, R,
                        N: tl.constexpr, K: tl.constexpr, E: tl.constexpr, E_P2: tl.constexpr,
                        TRANS_B: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        NUM_PROGRAMS: tl.constexpr, WS: tl.constexpr, TMA_STORE: tl.constexpr,
                        GATHER: tl.constexpr, SCALED: tl.constexpr):
        """GATHER: row r of a is a_ptr's row index[r] (pointer loads; TMA cannot gather on Hopper).
        SCALED: a and b in e4m3, the product times a_scale[row of a] and b_scale[e, column] (fp32)."""
        pid = tl.program_id(0)
        num_n: tl.constexpr = N // BN
        if TMA_STORE:
            c_desc = _ragged_descriptor(c_ptr, N, BM, BN // 2)  # two column slices: half the tile's buffer
        if not GATHER:
            a_desc = tl.make_tensor_descriptor(a_ptr, shape=[R, K], strides=[K, 1], block_shape=[BM, BK])
        if TRANS_B:
            b_desc = tl.make_tensor_descriptor(b_ptr, shape=[E * N, K], strides=[K, 1], block_shape=[BN, BK])
        else:
            b_desc = tl.make_tensor_descriptor(b_ptr, shape=[E * K, N], strides=[N, 1], block_shape=[BK, BN])
        es, gstart, gend = _groups(offs_ptr, E, E_P2)
        tile_end = tl.cumsum(tl.where(es < E, (gend - gstart + BM - 1) // BM, 0), 0)  # BM-row tiles up to e's end
        tiles = tl.max(tile_end) * num_n
        for t in tl.range(pid, tiles, NUM_PROGRAMS, flatten=True, warp_specialize=WS):
            tm = t // num_n
            tn = t % num_n
            e = tl.sum((tile_end <= tm).to(tl.int32))  # tm's expert
            mine = es == e
            start = tl.sum(tl.where(mine, gstart, 0)) + (tm - tl.sum(tl.where(es == e - 1, tile_end, 0))) * BM
            rows = tl.sum(tl.where(mine, gend, 0)) - start
            acc = tl.zeros([BM, BN], dtype=tl.float32)
            if GATHER:  # rows past R read row 0: like the rows past the expert's end, they are not stored
                r = start + tl.arange(0, BM)
                src = tl.load(index_ptr + r, mask=r < R, other=0).to(tl.int64)
            for kk in range(K // BK):
                if GATHER:
                    a = tl.load(a_ptr + src[:, None] * K + (kk * BK + tl.arange(0, BK))[None, :])
                else:
                    a = a_desc.load([start, kk * BK])  # rows past the expert's feed rows not stored
                if TRANS_B:
                    b = b_desc.load([e * N + tn * BN, kk * BK]).T
                else:
                    b = b_desc.load([e * K + kk * BK, tn * BN])
                acc = tl.dot(a, b, acc)
            if SCALED:  # rows past R (read as row 0 or zeros) are not stored
                r = start + tl.arange(0, BM)
                a_scale = tl.load(a_scale_ptr + (src if GATHER else r), mask=r < R, other=0.0)
                b_scale = tl.load(b_scale_ptr + e * N + tn * BN + tl.arange(0, BN))
                acc = acc * a_scale[:, None] * b_scale[None, :]
            if TMA_STORE:  # rows past the expert's end fall outside the ragged window: not written
                lo, hi = _halves(acc.to(c_ptr.dtype.element_ty), BM, BN)
                _ragged_store(c_desc, start, rows, 0, tn * BN, lo, BM, BN // 2)
                _ragged_store(c_desc, start, rows, 0, tn * BN + BN // 2, hi, BM, BN // 2)
            else:
                r = tl.arange(0, BM)
                ptrs = c_ptr + (start + r).to(tl.int64)[:, None] * N + (tn * BN + tl.arange(0, BN))[None, :]
                tl.store(ptrs, acc.to(c_ptr.dtype.element_ty), mask=(r < rows)[:, None])

    @triton.jit
    def _pieces(offs_ptr, E: tl.constexpr, E_P2: tl.constexpr, CUT: tl.constexpr, PIECE: tl.constexpr):
        """Per expert (a [E_P2] vector): first row, end row, whether it is cut (longer than CUT rows)
        and its pieces (⌈rows / PIECE⌉ if cut, else 1; 0 past E)."""
        es, gstart, gend = _groups(offs_ptr, E, E_P2)
        rows = gend - gstart
        cut = rows > CUT
        pieces = tl.where(es < E, tl.where(cut, (rows + PIECE - 1) // PIECE, 1), 0)
        return es, gstart, gend, cut, pieces

    @triton.jit
    def _store_tile(c_desc, acc, e, tm, tn, M: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    SLICES: tl.constexpr):
        out = acc.to(c_desc.dtype)
        if SLICES == 1:
            c_desc.store([e * M + tm * BM, tn * BN], out)
        else:  # two column slices: the store's shared memory buffer is half the tile
            lo, hi = _halves(out, BM, BN)
            c_desc.store([e * M + tm * BM, tn * BN], lo)
            c_desc.store([e * M + tm * BM, tn * BN + BN // 2], hi)

    @triton.jit
    def _rows_load(desc, ptr, index_ptr, start, rows, row, col, COLS: tl.constexpr, BR: tl.constexpr,
                   BC: tl.constexpr, GATHER: tl.constexpr):
        """`_ragged_load`; with GATHER, row r is ptr's row index[r] (a [*, COLS] tensor), by pointer loads."""
        if GATHER:
            r = row + tl.arange(0, BR)
            src = tl.load(index_ptr + start + r, mask=r < rows, other=0).to(tl.int64)
            return tl.load(ptr + src[:, None] * COLS + (col + tl.arange(0, BC))[None, :], mask=(r < rows)[:, None],
                           other=0.0)
        return _ragged_load(desc, start, rows, row, col, BR, BC)

    @triton.jit
    def _wgrad_tile(a_desc, b_desc, a_ptr, b_ptr, a_index_ptr, b_index_ptr, row0, rows, tm, tn,
                    M: tl.constexpr, N: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr):
        """Σ over rows row0.. row0 + rows of a[r, tile m]ᵀ b[r, tile n], fp32 [BM, BN]."""
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for kk in range(tl.cdiv(rows, BK)):  # zeros past the rows
            at = _rows_load(a_desc, a_ptr, a_index_ptr, row0, rows, kk * BK, tm * BM, M, BK, BM, GATHER_A)
            b = _rows_load(b_desc, b_ptr, b_index_ptr, row0, rows, kk * BK, tn * BN, N, BK, BN, GATHER_B)
            acc = tl.dot(at.T, b, acc)
        return acc

    @triton.jit
    def _uncut_tile(t, pid, per: tl.constexpr, E: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                    LONGEST_FIRST: tl.constexpr):
        """The uncut schedule's t-th item's place s (t a scalar or a vector): with LONGEST_FIRST the items
        of the longest experts come first and are dealt to the programs back and forth: round r goes to
        programs 0.. in even rounds and ..0 in odd ones (a whole odd round only: a last partial round runs
        forwards so that its items all have programs); else expert by expert. s // per is the expert's place
        in that order, s % per its output tile."""
        if LONGEST_FIRST:
            rnd = t // NUM_PROGRAMS
            back = (rnd % 2 == 1) & ((rnd + 1) * NUM_PROGRAMS <= E * per)
            return tl.where(back, t + NUM_PROGRAMS - 1 - 2 * pid, t)
        return t

    @triton.jit
    def _uncut_item(t, pid, place, es, per: tl.constexpr, E: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                    LONGEST_FIRST: tl.constexpr):
        """The uncut schedule's t-th item: (s, e), the output tile s of expert e (`place`: each expert's
        place when sorted by rows, with LONGEST_FIRST)."""
        s = _uncut_tile(t, pid, per, E, NUM_PROGRAMS, LONGEST_FIRST)
        if LONGEST_FIRST:
            return s, tl.sum(tl.where(place == s // per, es, 0))
        return s, s // per

    @triton.jit
    def _uncut_items(ts, pid, place, es, per: tl.constexpr, E: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                     LONGEST_FIRST: tl.constexpr):
        """`_uncut_item` for a vector of items ts at once: ([T] s, [T] e)."""
        s = _uncut_tile(ts, pid, per, E, NUM_PROGRAMS, LONGEST_FIRST)
        if LONGEST_FIRST:
            return s, tl.sum(tl.where(place[None, :] == (s // per)[:, None], es[None, :], 0), 1)
        return s, s // per

    @triton.jit
    def _weight_grad_kernel(a_ptr, b_ptr, c_ptr, part_ptr, offs_ptr, next_ptr, a_index_ptr, b_index_ptr,
                            M: tl.constexpr, N: tl.constexpr, E: tl.constexpr, E_P2: tl.constexpr,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                            NUM_PROGRAMS: tl.constexpr, WS: tl.constexpr, SLICES: tl.constexpr,
                            CUT: tl.constexpr, PIECE: tl.constexpr, LONGEST_FIRST: tl.constexpr,
                            FLAT: tl.constexpr, ITEMS_P2: tl.constexpr, GATHER_A: tl.constexpr,
                            GATHER_B: tl.constexpr):
        """PIECE = 0: a work item is one output tile of one expert; with LONGEST_FIRST the items of the
        longest experts come first and each round of NUM_PROGRAMS items is dealt in the opposite
        direction to the one before, else expert by expert in turn.
        Otherwise experts longer than CUT rows are cut into pieces of PIECE rows, an item is one output
        tile of one piece, items go largest piece first, and each program takes the next item left
        when it is done (a counter at `next_ptr`: the longest items start first and the rest fill in).
        Cut pieces' tiles go to fp32 `part` (slot: the cut experts' pieces before it in expert order,
        then the piece) and `_sum_pieces_kernel` adds them in order; uncut experts are stored here.
        GATHER_A / GATHER_B: row r of a / b is its tensor's row a_index[r] / b_index[r]."""
        pid = tl.program_id(0)
        num_n: tl.constexpr = N // BN
        per: tl.constexpr = (M // BM) * num_n
        a_desc = _ragged_descriptor(a_ptr, M, BK, BM)
        b_desc = _ragged_descriptor(b_ptr, N, BK, BN)
        c_desc = tl.make_tensor_descriptor(c_ptr, shape=[E * M, N], strides=[N, 1], block_shape=[BM, BN // SLICES])
        if PIECE == 0:
            es, gstart, gend = _groups(offs_ptr, E, E_P2)
            place = es
            if LONGEST_FIRST:  # each expert's place when sorted by rows, longest first
                place = tl.sum(_ahead(tl.where(es < E, gend - gstart, -1), es).to(tl.int32), 1)
            if FLAT:
                # this program's k-steps, max(1, ⌈rows / BK⌉) an item (an empty expert's tile: one step
                # of zeros, stored), counted first (its ≤ ITEMS_P2 items at once) so that one loop of
                # fixed length runs them all
                ts = pid + tl.arange(0, ITEMS_P2) * NUM_PROGRAMS
                s, e = _uncut_items(ts, pid, place, es, per, E, NUM_PROGRAMS, LONGEST_FIRST)
                rows = tl.sum(tl.where(es[None, :] == e[:, None], (gend - gstart)[None, :], 0), 1)
                total = tl.sum(tl.where(ts < E * per, tl.maximum(tl.cdiv(rows, BK), 1), 0))
                t = pid - NUM_PROGRAMS
                kk = pid * 0
                steps = pid * 0
                s = pid * 0
                e = pid * 0
                row0 = pid * 0
                rows = pid * 0
                acc = tl.zeros([BM, BN], dtype=tl.float32)
                for _ in tl.range(0, total, warp_specialize=WS):
                    if kk == 0:  # the next item
                        t += NUM_PROGRAMS
                        s, e = _uncut_item(t, pid, place, es, per, E, NUM_PROGRAMS, LONGEST_FIRST)
                        row0 = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
                        rows = tl.load(offs_ptr + e) - row0
                        steps = tl.maximum(tl.cdiv(rows, BK), 1)
                    tm = (s % per) // num_n
                    tn = s % num_n
                    at = _rows_load(a_desc, a_ptr, a_index_ptr, row0, rows, kk * BK, tm * BM, M, BK, BM,
                                    GATHER_A)  # zeros past the rows
                    b = _rows_load(b_desc, b_ptr, b_index_ptr, row0, rows, kk * BK, tn * BN, N, BK, BN, GATHER_B)
                    acc = tl.dot(at.T, b, acc)
                    kk += 1
                    if kk == steps:
                        _store_tile(c_desc, acc, e, tm, tn, M, BM, BN, SLICES)
                        acc = tl.zeros([BM, BN], dtype=tl.float32)
                        kk = pid * 0
            else:
                for t in tl.range(pid, E * per, NUM_PROGRAMS, flatten=True, warp_specialize=WS):
                    s, e = _uncut_item(t, pid, place, es, per, E, NUM_PROGRAMS, LONGEST_FIRST)
                    row0 = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
                    rows = tl.load(offs_ptr + e) - row0
                    acc = _wgrad_tile(a_desc, b_desc, a_ptr, b_ptr, a_index_ptr, b_index_ptr, row0, rows,
                                      (s % per) // num_n, s % num_n, M, N, BM, BN, BK, GATHER_A, GATHER_B)
                    _store_tile(c_desc, acc, e, (s % per) // num_n, s % num_n, M, BM, BN, SLICES)
        else:
            es, gstart, gend, cut, pieces = _pieces(offs_ptr, E, E_P2, CUT, PIECE)
            slot_end = tl.cumsum(tl.where(cut, pieces, 0), 0)  # partial slots up to e's end
            # experts by piece length, longest first (ties: lower expert first); padding last
            size = tl.where(es < E, tl.where(cut, PIECE, gend - gstart), -1)
            first = tl.sum(tl.where(_ahead(size, es), pieces[None, :], 0), 1)  # e's first piece in that order
            items = tl.sum(pieces) * per
            t = pid
            while t < items:
                g = t // per  # the piece, in size order
                mine = (first <= g) & (g < first + pieces)
                e = tl.sum(tl.where(mine, es, 0))
                k = g - tl.sum(tl.where(mine, first, 0))  # the piece's index in its expert
                is_cut = tl.sum(tl.where(mine, cut.to(tl.int32), 0)) > 0
                row0 = tl.sum(tl.where(mine, gstart, 0)) + k * PIECE
                rows = tl.sum(tl.where(mine, gend, 0)) - row0
                rows = tl.where(is_cut, tl.minimum(rows, PIECE), rows)
                tm = (t % per) // num_n
                tn = t % num_n
                acc = _wgrad_tile(a_desc, b_desc, a_ptr, b_ptr, a_index_ptr, b_index_ptr, row0, rows, tm, tn,
                                  M, N, BM, BN, BK, GATHER_A, GATHER_B)
                if is_cut:  # fp32, summed by the second pass
                    slot = tl.sum(tl.where(es == e - 1, slot_end, 0)) + k
                    ptrs = (part_ptr + slot.to(tl.int64) * (M * N) + (tm * BM + tl.arange(0, BM))[:, None] * N
                            + (tn * BN + tl.arange(0, BN))[None, :])
                    tl.store(ptrs, acc)
                else:
                    _store_tile(c_desc, acc, e, tm, tn, M, BM, BN, SLICES)
                t = NUM_PROGRAMS + tl.atomic_add(next_ptr, 1)

    @triton.jit
    def _sum_pieces_kernel(c_ptr, part_ptr, offs_ptr, M: tl.constexpr, N: tl.constexpr, E: tl.constexpr,
                           E_P2: tl.constexpr, CUT: tl.constexpr, PIECE: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr):
        """out[e] = the sum of a cut expert's pieces in `part`, in piece order (deterministic); one
        program per (expert, [BM, BN] block), those of uncut experts return at once."""
        e = tl.program_id(0)
        block = tl.program_id(1)
        es, gstart, gend, cut, pieces = _pieces(offs_ptr, E, E_P2, CUT, PIECE)
        if tl.sum(tl.where(es == e, cut.to(tl.int32), 0)) > 0:
            mine = tl.sum(tl.where(es == e, pieces, 0))
            slot0 = tl.sum(tl.where((es < e) & cut, pieces, 0))
            bm = block // (N // BN)
            bn = block % (N // BN)
            offsets = (bm * BM + tl.arange(0, BM))[:, None] * N + (bn * BN + tl.arange(0, BN))[None, :]
            acc = tl.zeros([BM, BN], dtype=tl.float32)
            for k in range(mine):
                acc += tl.load(part_ptr + (slot0 + k).to(tl.int64) * (M * N) + offsets)
            tl.store(c_ptr + e.to(tl.int64) * (M * N) + offsets, acc.to(c_ptr.dtype.element_ty))

    _SMS: dict[int, int] = {}

    def _programs(device: torch.device, tiles: int) -> int:
        """One program per SM (4 under the interpreter), fewer when there are fewer tiles."""
        if device.type != "cuda":
            return max(1, min(4, tiles))
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _SMS:
            _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
        return max(1, min(_SMS[index], tiles))

    def _scratch(size: int, alignment: int, stream):
        """Global memory for the descriptors the kernels build (Triton asks through `set_allocator`;
        inductor sets its own before each launch of compiled code)."""
        return torch.empty(size, dtype=torch.int8, device="cuda")

    def _launch(kernel, wrap):
        if wrap is _plain and hasattr(triton, "set_allocator"):
            triton.set_allocator(_scratch)
        return wrap(kernel)

    def _plain(kernel):
        return kernel

    def launch_rows_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, trans_b: bool = False,
                       config=None, warp_specialize: bool | None = None, wrap=_plain,
                       a_index: torch.Tensor | None = None) -> torch.Tensor:
        """The kernel itself (any device Triton runs on, the interpreter included): a [R, K],
        b [E, K, N] (trans_b: [E, N, K]), offs [E] int32 → [R, N]; with `a_index` [R], a[a_index]
        read in place (a: [T, K]). `wrap` is torch.compile's `wrap_triton` under the custom op."""
        default, ws = rows_config(a.shape[1], b.shape[1] if trans_b else b.shape[2], trans_b)
        return _launch_rows(a, b, offs, trans_b, None, a.dtype, config or default,
                            ws if warp_specialize is None else warp_specialize, wrap, a_index)

    def launch_scaled_rows_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                              offs: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16, config=None,
                              warp_specialize: bool | None = None, wrap=_plain,
                              a_index: torch.Tensor | None = None) -> torch.Tensor:
        """out[r] = (a[r] @ b[e(r)]ᵀ) · a_scale[r] · b_scale[e(r)] for e4m3 a [R, K] and b [E, N, K] (each
        row of b an output column, K-major as FP8 tensor cores take both operands), fp32 scales a_scale
        [R] and b_scale [E, N]: [R, N] in out_dtype. With `a_index`, row r is a[a_index[r]] and its
        scale a_scale[a_index[r]]."""
        default, ws = scaled_rows_config(a.shape[1], b.shape[1])
        return _launch_rows(a, b, offs, True, (a_scale.reshape(-1).contiguous(), b_scale.contiguous()), out_dtype,
                            config or default, ws if warp_specialize is None else warp_specialize, wrap, a_index)

    def _launch_rows(a, b, offs, trans_b: bool, scales, out_dtype, config, ws: bool, wrap, a_index):
        a, b = a.contiguous(), b.contiguous()
        K = a.shape[1]
        R = a.shape[0] if a_index is None else a_index.numel()
        E = b.shape[0]
        N = b.shape[1] if trans_b else b.shape[2]
        bm, bn, bk, warps, stages = config
        assert (b.shape[2] if trans_b else b.shape[1]) == K and K % bk == 0 and N % bn == 0, (a.shape, b.shape, trans_b)
        out = a.new_empty(R, N, dtype=out_dtype)
        if R == 0:
            return out
        programs = _programs(a.device, (triton.cdiv(R, bm) + E) * (N // bn))
        a_scale, b_scale = scales if scales is not None else (offs, offs)
        _launch(_rows_mm_kernel, wrap)[(programs,)](
            a, b, out, offs, offs if a_index is None else a_index.contiguous(), a_scale, b_scale, R, N=N, K=K, E=E,
            E_P2=triton.next_power_of_2(E), TRANS_B=trans_b, BM=bm, BN=bn, BK=bk, NUM_PROGRAMS=programs, WS=ws,
            TMA_STORE=ROWS_TMA_STORE, GATHER=a_index is not None, SCALED=scales is not None, num_warps=warps,
            num_stages=stages)
        return out

    def launch_weight_grad_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, config=None,
                              warp_specialize: bool = False, cut: tuple[int, int] | None = None,
                              wrap=_plain, a_index: torch.Tensor | None = None,
                              b_index: torch.Tensor | None = None) -> torch.Tensor:
        """The kernel itself: a [R, M], b [R, N], offs [E] int32 → [E, M, N] (zeros for an empty expert).
        `cut`: (cut, piece), experts longer than `cut` rows in pieces of `piece` (None: `wgrad_cut`;
        (0, 0): none). With `a_index` / `b_index` [R], a[a_index] / b[b_index] read in place."""
        bm, bn, bk, warps, stages, slices = config or WGRAD_CONFIG
        if config is None and (a_index is not None or b_index is not None):
            stages = WGRAD_GATHER_STAGES
        a, b = a.contiguous(), b.contiguous()
        M, N, E = a.shape[1], b.shape[1], offs.numel()
        R = next((i.numel() for i in (a_index, b_index) if i is not None), a.shape[0])
        assert M % bm == 0 and N % bn == 0, (M, N, bm, bn)
        out = a.new_empty(E, M, N)
        if R == 0:
            return out.zero_()
        per = (M // bm) * (N // bn)
        longer, piece = cut if cut is not None else wgrad_cut(R, E, M, N, per, bk, _programs(a.device, R * per))
        assert piece % bk == 0 and (piece > 0) == (longer > 0), (longer, piece, bk)
        e_p2 = triton.next_power_of_2(E)
        if piece:
            # cut experts are longer than `longer` rows: fewer than R / piece + R / longer pieces
            part = a.new_empty(triton.cdiv(R, piece) + triton.cdiv(R, longer), M, N, dtype=torch.float32)
            counter = torch.zeros(1, dtype=torch.int32, device=a.device)
            programs = _programs(a.device, (E + triton.cdiv(R, piece)) * per)
        else:
            part, counter, programs = out, offs, _programs(a.device, E * per)
        # the flat loop counts a program's items against every expert at once: [ITEMS_P2, E_P2] in registers
        items_p2 = triton.next_power_of_2(triton.cdiv(E * per, programs))
        flat = WGRAD_FLAT and not piece and items_p2 * e_p2 <= 16384
        _launch(_weight_grad_kernel, wrap)[(programs,)](
            a, b, out, part, offs, counter, offs if a_index is None else a_index.contiguous(),
            offs if b_index is None else b_index.contiguous(), M=M, N=N, E=E, E_P2=e_p2, BM=bm, BN=bn, BK=bk,
            NUM_PROGRAMS=programs, WS=warp_specialize, SLICES=slices, CUT=longer, PIECE=piece,
            LONGEST_FIRST=LONGEST_FIRST, FLAT=flat, ITEMS_P2=items_p2 if flat else 1, GATHER_A=a_index is not None,
            GATHER_B=b_index is not None, num_warps=warps, num_stages=stages)
        if piece:
            sbm, sbn = min(bm, 64), min(bn, 128)
            _launch(_sum_pieces_kernel, wrap)[(E, (M // sbm) * (N // sbn))](
                out, part, offs, M=M, N=N, E=E, E_P2=e_p2, CUT=longer, PIECE=piece, BM=sbm, BN=sbn, num_warps=4)
        return out

    @torch.library.triton_op("megamoe::grouped_rows_mm", mutates_args=())
    def _rows_mm_op(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, trans_b: bool,
                    a_index: torch.Tensor | None = None) -> torch.Tensor:
        return launch_rows_mm(a, b, offs, trans_b, wrap=torch.library.wrap_triton, a_index=a_index)

    @torch.library.triton_op("megamoe::grouped_scaled_rows_mm", mutates_args=())
    def _scaled_rows_mm_op(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                           offs: torch.Tensor, a_index: torch.Tensor | None = None) -> torch.Tensor:
        return launch_scaled_rows_mm(a, a_scale, b, b_scale, offs, wrap=torch.library.wrap_triton, a_index=a_index)

    @torch.library.triton_op("megamoe::grouped_weight_grad_mm", mutates_args=())
    def _weight_grad_op(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, a_index: torch.Tensor | None = None,
                        b_index: torch.Tensor | None = None) -> torch.Tensor:
        return launch_weight_grad_mm(a, b, offs, wrap=torch.library.wrap_triton, a_index=a_index, b_index=b_index)


def _rows(t: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    return t if index is None else t[index]


def rows_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, trans_b: bool = False,
            a_index: torch.Tensor | None = None) -> torch.Tensor:
    """out[r] = a[r] @ b[e(r)] (b[e(r)]ᵀ with trans_b) for rows sorted by expert: [R, N]. With `a_index`
    [R], row r is a[a_index[r]] (the kernel reads it in place; torch's path gathers a copy)."""
    if rows_available(a, b, trans_b):
        return (torch.ops.megamoe.grouped_rows_mm(a, b, offs, trans_b, a_index) if torch.compiler.is_compiling()
                else launch_rows_mm(a, b, offs, trans_b, a_index=a_index))
    return torch._grouped_mm(_rows(a, a_index), b.transpose(-2, -1) if trans_b else b, offs=offs)


def scaled_rows_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                   offs: torch.Tensor) -> torch.Tensor:
    """(a[r] @ b[e(r)]ᵀ) · a_scale[r] · b_scale[e(r)] in bf16 for e4m3 a [R, K], b [E, N, K] and fp32
    scales [R] and [E, N] (`scaled_rows_available`: the caller has `torch._scaled_grouped_mm` otherwise)."""
    if torch.compiler.is_compiling():
        return torch.ops.megamoe.grouped_scaled_rows_mm(a, a_scale, b, b_scale, offs)
    return launch_scaled_rows_mm(a, a_scale, b, b_scale, offs)


def weight_grad_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, a_index: torch.Tensor | None = None,
                   b_index: torch.Tensor | None = None) -> torch.Tensor:
    """out[e] = a_eᵀ b_e over each expert's rows: [E, M, N] (an expert without rows gets zeros). With
    `a_index` / `b_index`, row r of a / b is a[a_index[r]] / b[b_index[r]]."""
    if wgrad_available(a, b):
        return (torch.ops.megamoe.grouped_weight_grad_mm(a, b, offs, a_index, b_index) if torch.compiler.is_compiling()
                else launch_weight_grad_mm(a, b, offs, a_index=a_index, b_index=b_index))
    return torch._grouped_mm(_rows(a, a_index).transpose(-2, -1), _rows(b, b_index), offs=offs)


class _Linear(torch.autograd.Function):
    """x @ w[e(r)] per row, and its backward's two products, through `rows_mm` and `weight_grad_mm`."""

    @staticmethod
    def forward(ctx, x, w, offs):
        ctx.save_for_backward(x, w, offs)
        return rows_mm(x, w, offs)

    @staticmethod
    def backward(ctx, grad_out):
        x, w, offs = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dx = rows_mm(grad_out, w, offs, trans_b=True) if ctx.needs_input_grad[0] else None
        dw = weight_grad_mm(x, grad_out, offs) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm(x, w, offs=offs) for x [R, K], w [E, K, N], differentiable."""
    return _Linear.apply(x, w, offs)


class _GatheredLinear(torch.autograd.Function):
    """x[index[r]] @ w[e(r)] per row r, the token rows read in place by the forward and the weight
    gradient; the rows' input gradients are summed into their tokens (each token has k rows)."""

    @staticmethod
    def forward(ctx, x, w, offs, index, inverse, k: int):
        ctx.save_for_backward(x, w, offs, index, inverse)
        ctx.k = k
        return rows_mm(x, w, offs, a_index=index)

    @staticmethod
    def backward(ctx, grad_out):
        x, w, offs, index, inverse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = fused_permute.sum_rows(rows_mm(grad_out, w, offs, trans_b=True), inverse.view(-1, ctx.k))
        if ctx.needs_input_grad[1]:
            dw = weight_grad_mm(x, grad_out, offs, a_index=index)
        return dx, dw, None, None, None, None


def gathered_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, index: torch.Tensor,
                    inverse: torch.Tensor, k: int) -> torch.Tensor:
    """linear(x[index], w, offs) for tokens x [T, d] with k rows each (`inverse`: token t's j-th row is
    inverse[t·k + j]), differentiable, without the [T·k, d] copy where the kernels run."""
    return _GatheredLinear.apply(x, w, offs, index, inverse, k)
