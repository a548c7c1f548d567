"""`train.eval_tasks` in the training loop: scored at every evaluation, in any parallel layout.

Windows are `data.seq_length` wide and batches `train.micro_batch_size` rows, the shape every
layout's forward takes (the pipeline's activations, sequence parallelism's chunks). Each
data-parallel rank scores a share of the batches; the log-likelihoods are summed over data
parallelism, and over pipeline stages (only the last one holds logits), so every rank ends with
all of them and the accuracies of the 1-rank run.
"""

from functools import partial

import torch

from ..config import Config, ConfigError
from ..parallel import comm, pipeline
from ..parallel.state import ParallelState
from .evaluator import Evaluator
from .score import model_forward, row_logliks
from .tasks import TaskError, load_task

LOGGED = ("acc", "acc_norm")


class TrainingEvaluator:
    def __init__(self, cfg: Config, state: ParallelState, tokenizer):
        try:
            tasks = [load_task(spec, cfg.train.eval_limit) for spec in cfg.train.eval_tasks]
        except TaskError as e:
            raise ConfigError(f"train.eval_tasks: {e}") from None
        self.cfg, self.state = cfg, state
        self.evaluator = Evaluator(tasks, tokenizer, cfg.data.seq_length) if tasks else None

    @torch.no_grad()
    def __call__(self, engine, device: torch.device) -> dict:
        """{"task/NAME/acc": ..., "task/NAME/acc_norm": ...} (nothing without tasks)."""
        if self.evaluator is None:
            return {}
        s, cfg = self.state, self.cfg
        if s.pp > 1:
            forward = partial(_pipeline_forward, engine, s, cfg, device)
        else:
            forward = model_forward(engine, engine.module.loss_fn, device)
        logliks = self.evaluator.loglikelihoods(forward, cfg.train.micro_batch_size, cfg.data.seq_length,
                                                s.dp_rank, s.dp)
        logliks = comm.all_reduce(logliks, s.dp_group)
        if s.pp > 1:
            logliks = comm.all_reduce(logliks, s.pp_group)
        return {f"task/{name}/{key}": value for name, result in self.evaluator.results(logliks).items()
                for key, value in result.items() if key in LOGGED}


def _pipeline_forward(engine, state, cfg, device, tokens, labels):
    tokens, labels = tokens.to(device), labels.to(device)
    out = pipeline.forward_only(engine, state, cfg, tokens, labels)
    return None if out is None else row_logliks(engine.module.loss_fn, out.logits, labels)
