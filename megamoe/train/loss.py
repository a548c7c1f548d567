"""The language-model loss, owned by the trainer: the model returns logits and its aux losses.

A micro-batch's LM loss is the sum of its targets' cross-entropies divided by a number the
trainer passes (torchtitan's `global_valid_tokens`): the step's target count over data
parallelism / (micro-batches × DP), so that every target of a step weighs the same whatever
the split into micro-batches and ranks. Under tensor parallelism the logits are vocab-local
and the sum is the vocab-parallel one, which never gathers the vocabulary.
"""

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from ..parallel.state import ParallelState
from ..parallel.tensor import vocab_parallel_cross_entropy

# (logits [..., V] or vocab-local [..., V/tp], labels [...]) -> Σ over labels != -100 (fp32)
CrossEntropy = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over the targets (labels != -100) of the token cross-entropy, in fp32;
    logits [..., V], labels [...]."""
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=-100,
                           reduction="sum")


def cross_entropy_for(state: ParallelState) -> CrossEntropy:
    """The summed cross-entropy of this layout's logits: vocab-parallel under tensor parallelism."""
    if state.tp == 1:
        return cross_entropy
    return partial(vocab_parallel_cross_entropy, group=state.tp_group)
