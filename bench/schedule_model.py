"""How evenly the weight gradient's tiles fall on the GPU's programs at a model's routing loads (CPU only).

    python bench/schedule_model.py docs/perf/2026-12-06-h100-session13/c2_bench_ab.jsonl

Reads the per-layer expert loads that `bench_model.py` / `bench_ab.py` record, and for OLMoE's two weight
gradients (w1: 128 output tiles an expert, w2: 64; 132 programs) gives the busiest program's work over a
perfect balance, summed over the layers, for three ways of dealing the tiles: expert after expert in
turn, longest expert first and back and forth (`grouped_gemm.LONGEST_FIRST`), and each tile to the least
loaded program, longest first (a bound). A tile's cost is its expert's row blocks of 64 plus 2 (its
store). This is the model session 13 used to predict the kernel's change (docs/performance.md).
"""

import argparse
import heapq
import json
import math


def loads_of(path: str) -> list[list[int]]:
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if row.get("expert_loads"):
                return row["expert_loads"]
    raise SystemExit(f"schedule_model.py: error: {path} holds no expert_loads; run bench_model.py first")


def in_turn(items: list[int], programs: int) -> int:
    work = [0] * programs
    for t, cost in enumerate(items):
        work[t % programs] += cost
    return max(work)


def back_and_forth(items: list[int], programs: int) -> int:
    """As the kernel: longest first; odd rounds dealt backwards, a last partial round forwards."""
    items, work = sorted(items, reverse=True), [0] * programs
    for t, cost in enumerate(items):
        rnd, pos = divmod(t, programs)
        back = rnd % 2 == 1 and (rnd + 1) * programs <= len(items)
        work[programs - 1 - pos if back else pos] += cost
    return max(work)


def least_loaded(items: list[int], programs: int) -> int:
    heap = [0] * programs
    for cost in sorted(items, reverse=True):
        heapq.heappush(heap, heapq.heappop(heap) + cost)
    return max(heap)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("jsonl")
    ap.add_argument("--programs", type=int, default=132)
    args = ap.parse_args()
    loads = loads_of(args.jsonl)
    for name, tiles in (("w1", 128), ("w2", 64)):
        totals = {"in turn": 0, "back and forth": 0, "least loaded": 0, "perfect": 0.0}
        for layer in loads:
            items = [math.ceil(rows / 64) + 2 for rows in layer for _ in range(tiles)]
            totals["in turn"] += in_turn(items, args.programs)
            totals["back and forth"] += back_and_forth(items, args.programs)
            totals["least loaded"] += least_loaded(items, args.programs)
            totals["perfect"] += sum(items) / args.programs
        print(f"{name}: " + ", ".join(f"{k} {v / totals['perfect']:.3f}" for k, v in totals.items() if k != "perfect"))


if __name__ == "__main__":
    main()
