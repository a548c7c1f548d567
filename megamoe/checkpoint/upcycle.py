"""Sparse upcycling: a dense checkpoint → MoE, every expert a copy of the dense FFN.

The dense SwiGLU of each block (`layers.i.ffn.w1` [d, 2F], `w2` [F, d]) becomes the stacked
experts (`ffn.experts.w1` [E, d, 2F], `w2` [E, F, d]); each block gets a fresh router, the one
the MoE model itself starts from (`megamoe.model.olmoe.initial_value`). Everything else is
copied, as are the FFNs of the layers that `moe.dense_layers` keeps dense. The result is a new
run at step 0 (fresh optimizer and LR schedule), as in the OLMoE upcycling ablation.
"""

import re
from pathlib import Path

from ..model.olmoe import initial_value
from .canonical import config_with, iter_canonical, resolve, write_run
from .files import CheckpointError, read_meta


def upcycle(src: Path, out: Path, num_experts: int, top_k: int, overrides: list[str] = (),
            overwrite: bool = False, progress: bool = True) -> Path:
    step_dir = resolve(src)
    base = read_meta(step_dir)["config"]
    if base["moe"]["num_experts"]:
        raise CheckpointError(f"{step_dir} is already a MoE checkpoint (moe.num_experts="
                              f"{base['moe']['num_experts']}); upcycling starts from a dense one")
    cfg = config_with(base, [f"moe.num_experts={num_experts}", f"moe.top_k={top_k}", *overrides])
    if cfg.moe.dense_layers and cfg.moe.dense_ffn_hidden is None:
        cfg.moe.dense_ffn_hidden = base["moe"]["ffn_hidden"]  # moe.dense_layers keep their FFN as it is
    d, std, seed = cfg.model.d_model, cfg.model.init_std, cfg.train.seed

    def tensors():
        for name, t in iter_canonical(step_dir, progress):
            m = re.fullmatch(r"layers\.(\d+)\.ffn\.(w1|w2)", name)
            if m is None or int(m.group(1)) in cfg.moe.dense_layers:
                yield name, t
                continue
            i, w = m.groups()
            yield f"layers.{i}.ffn.experts.{w}", t.unsqueeze(0).expand(num_experts, *t.shape)
            if w == "w1":
                router = f"layers.{i}.ffn.router.weight"
                yield router, initial_value(router, (num_experts, d), std, seed)

    return write_run(out, cfg, tensors(), overwrite=overwrite)
