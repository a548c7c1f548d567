"""Global-batch load balancing (`moe.lb_loss_scope: global_batch`).

Each router's load-balancing loss counts its load fractions f_i over the micro-batches of every
data-parallel rank together (its sequence-parallel chunks already are whole: the router sees the
gathered sequence), as if they were one micro-batch; the gradient flows through this rank's mean
probabilities only. DP2 at micro-batch 4 is then the 1-rank run at micro-batch 8.
"""

from torch import nn

from ..moe.router import Router
from .state import ParallelState


def apply_global_load_balancing(model: nn.Module, state: ParallelState) -> nn.Module:
    for router in [m for m in model.modules() if isinstance(m, Router)]:
        router.lb_group = state.dp_group
    return model
