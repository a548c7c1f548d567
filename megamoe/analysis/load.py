"""Load-balance statistics of a training step, and the layers × experts heatmap.

`load` is the step's [MoE layers, E] assignment counts summed over every rank (the trainer's);
row r is the r-th MoE layer (`Config.moe_layer_ids`). Per layer:
  load_max_over_mean  the busiest expert's load over the mean load (1 = perfectly balanced)
  load_cv             coefficient of variation of the loads (std / mean, population std)
  dropped_fraction    share of the routed assignments dropped past capacity (capacity routing)
  bias_spread         max − min of the aux-loss-free expert bias
"""

import numpy as np


def step_load_metrics(load, routed: int | None = None, bias=None) -> dict[str, list[float]]:
    """load [L, E] (a CPU tensor or array); routed: assignments the router made per layer before
    dropping (None: no dropping); bias [L, E] or None. In numpy: with torch's CPU ops this took
    ~6 ms of the trainer's host time a step on the H100 machine, most of it in `max(dim)` over
    [8, 64] values (docs/performance.md, session 10)."""
    load = np.asarray(load, dtype=np.float64)
    mean = np.maximum(load.mean(-1), 1e-12)
    out = {"load_max_over_mean": (load.max(-1) / mean).tolist(),
           "load_cv": (load.std(-1) / mean).tolist()}
    if routed is not None:
        out["dropped_fraction"] = (1 - load.sum(-1) / routed).tolist()
    if bias is not None:
        bias = np.asarray(bias)
        out["bias_spread"] = (bias.max(-1) - bias.min(-1)).astype(np.float64).tolist()
    return out


def heatmap_image(shares: list[list[float]], cell: int = 8) -> np.ndarray:
    """[3, L·cell, E·cell] uint8 RGB image of the per-layer expert shares, each row scaled by its
    mean (1/E): white = fair share, red = above (2× or more saturates), blue = below."""
    s = np.asarray(shares, dtype=np.float64)
    ratio = s * s.shape[1]  # 1 = the fair share
    up = np.clip(ratio - 1, 0, 1)  # towards red
    down = np.clip(1 - ratio, 0, 1)  # towards blue
    rgb = np.stack([1 - down, 1 - up - down, 1 - up])  # [3, L, E], channels in [0, 1]
    rgb = np.clip(rgb, 0, 1).repeat(cell, axis=1).repeat(cell, axis=2)
    return (rgb * 255).round().astype(np.uint8)
