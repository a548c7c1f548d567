"""`train.eval_tasks` in the training loop: scored at every evaluation, in any parallel layout.

Windows are `data.seq_length` wide and batches `train.micro_batch_size` rows, the shape every
layout's forward takes (the pipeline's activations, sequence parallelism's chunks). Each
data-parallel rank scores a share of the batches; the log-likelihoods are summed over data
parallelism, and over pipeline stages (only the last one holds logits), so every rank ends with
all of them and the accuracies of the 1-rank run. (Tensor-parallel ranks score the same rows;
under TP the greedy check takes its maxima over the whole vocabulary.)
"""

from functools import partial

import torch

from ..config import Config, ConfigError
from ..parallel import comm, pipeline_schedule
from ..parallel.state import ParallelState
from ..train.loss import cross_entropy_for
from .evaluator import Evaluator
from .score import model_forward, row_scores
from .tasks import TaskError, load_task

LOGGED = ("acc", "acc_norm", "exact_match")


def load_tasks(cfg: Config) -> list:
    """`train.eval_tasks`, every file read and checked: a missing or malformed one is a ConfigError."""
    try:
        return [load_task(spec, cfg.train.eval_limit) for spec in cfg.train.eval_tasks]
    except TaskError as e:
        raise ConfigError(f"train.eval_tasks: {e}") from None


class TrainingEvaluator:
    def __init__(self, cfg: Config, state: ParallelState, tokenizer, tasks: list | None = None):
        """`tasks`: `load_tasks(cfg)`'s, where the caller read them already."""
        tasks = load_tasks(cfg) if tasks is None else tasks
        self.cfg, self.state = cfg, state
        self.evaluator = Evaluator(tasks, tokenizer, cfg.data.seq_length) if tasks else None

    @torch.no_grad()
    def __call__(self, engine, device: torch.device) -> dict:
        """{"task/NAME/acc": ..., "task/NAME/acc_norm": ...} (nothing without tasks)."""
        if self.evaluator is None:
            return {}
        s, cfg = self.state, self.cfg
        tp_group = s.tp_group if s.tp > 1 else None
        if s.pp > 1:
            forward = partial(_pipeline_forward, engine, s, cfg, device, tp_group)
        else:
            forward = model_forward(engine, cross_entropy_for(s), device, tp_group)
        scores = self.evaluator.scores(forward, cfg.train.micro_batch_size, cfg.data.seq_length, s.dp_rank, s.dp)
        scores = comm.all_reduce(scores, s.dp_group)
        if s.pp > 1:
            scores = comm.all_reduce(scores, s.pp_group)
        return {f"task/{name}/{key}": value for name, result in self.evaluator.results(scores).items()
                for key, value in result.items() if key in LOGGED}


def _pipeline_forward(engine, state, cfg, device, tp_group, tokens, labels):
    tokens, labels = tokens.to(device), labels.to(device)
    out = pipeline_schedule.forward_only(engine, state, cfg, tokens)
    return None if out is None else row_scores(cross_entropy_for(state), out.logits, labels, tp_group)
