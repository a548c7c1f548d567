"""Per-block `torch.compile`, applied to a built model (torchtitan's `apply_compile`).

Inductor keeps a row reduction's whole row in registers (a persistent reduction, one read of the row)
only up to 1,024 elements; wider rows get a loop that reads each row twice (the norm, then the scaled
output). OLMoE's rows are 2,048 wide: its RMSNorms and the FP8 quantizations' row maxima. `apply_compile`
installs `PersistentRows`, inductor's own heuristics but with inner reductions up to `PERSISTENT_ROWS`
elements kept persistent where that is set (`bench/bench_ab.py megamoe.model.compile.PERSISTENT_ROWS=2048,0`
is its A/B on the GPU: docs/performance.md, session 27).
"""

import torch
from torch import nn

# Inner (row) reductions up to this many elements are compiled as persistent reductions; inductor's own
# limit is 1,024. 0 keeps inductor's heuristics untouched (the default until an A/B on the GPU says 2,048 pays).
PERSISTENT_ROWS = 0

try:
    from torch._inductor import config as _inductor_config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V
except ImportError:  # a torch without inductor's heuristics seam: inductor's defaults
    InductorChoices = None


def persistent(hint, reduction_numel, cooperative: bool, known_leq) -> bool | None:
    """Whether a row reduction of `reduction_numel` elements (inductor's `hint`) is made persistent past
    inductor's own rule: True for an inner (row) reduction statically known to be at most PERSISTENT_ROWS
    (`known_leq(numel, limit)`) outside cooperative reductions; None leaves the choice to inductor."""
    if PERSISTENT_ROWS and not cooperative and hint == ReductionHint.INNER and known_leq(reduction_numel,
                                                                                           PERSISTENT_ROWS):
        return True
    return None


if InductorChoices is not None:
    class PersistentRows(InductorChoices):
        """Inductor's heuristics, with row reductions up to PERSISTENT_ROWS elements kept persistent."""

        @staticmethod
        def should_use_persistent_reduction(features, cooperative_reduction: bool = False) -> bool:
            if InductorChoices.should_use_persistent_reduction(features, cooperative_reduction):
                return True
            return bool(_inductor_config.triton.persistent_reductions and persistent(
                features.get_reduction_hint(), features.reduction_numel, cooperative_reduction,
                V.graph.sizevars.statically_known_leq))

        def uuid(self) -> str:  # part of inductor's cache key: another limit compiles anew
            return f"megamoe.PersistentRows({PERSISTENT_ROWS})"


def _install_heuristics() -> None:
    if InductorChoices is None or not PERSISTENT_ROWS:  # 0: inductor's own heuristics, as installed
        return
    if hasattr(_inductor_config, "inductor_choices_class"):
        _inductor_config.inductor_choices_class = PersistentRows
    V.set_choices_handler(PersistentRows())  # this thread's, which compiles (read lazily otherwise)


def apply_compile(model: nn.Module, mode: str | None = None) -> nn.Module:
    """torch.compile each decoder block in place: identical blocks share one compiled graph,
    and norms, RoPE, SwiGLU, the token permutations and residual adds get fused. Parameter
    names do not change (`Module.compile` compiles the call, not the module), so checkpoints
    are unaffected. mode "reduce-overhead" also replays each block's kernels as a CUDA graph."""
    torch._dynamo.reset()
    _install_heuristics()
    blocks = model.layers.values() if isinstance(model.layers, nn.ModuleDict) else model.layers
    for block in blocks:
        block.compile(mode=mode)
    return model
