"""Tasks -> scored windows -> accuracies: what the trainer and `megamoe-eval` share."""

import torch

from .score import Forward, encode_pair, make_window, score
from .tasks import Task


class Evaluator:
    """Every choice of every task, tokenised once into a window of at most `width` tokens."""

    def __init__(self, tasks: list[Task], tokenizer, width: int):
        self.tasks, self.pad_id = tasks, tokenizer.pad_id
        self.windows = [make_window(*encode_pair(tokenizer, item.context, choice), width)
                        for task in tasks for item in task.items for choice in item.choices]

    def scores(self, forward: Forward, rows: int, width: int | None, dp_rank: int = 0,
               dp: int = 1, progress=None) -> torch.Tensor:
        """This rank's share of the (log-likelihood, greedy) of all windows [n, 2] (zeros elsewhere)."""
        return score(forward, self.windows, rows, width, self.pad_id, dp_rank, dp, progress)

    def results(self, scores: torch.Tensor) -> dict[str, dict]:
        """Complete scores [n, 2] -> {task: {metrics, "items", "samples"}}. Multiple choice:
        "acc", "acc_norm" (cloze), samples {"logliks": [per choice], "gold", "pred"}. Completion:
        "exact_match" (the greedy continuation is the answer), samples {"loglik", "exact_match"}."""
        out, at = {}, 0
        for task in self.tasks:
            if task.format == "completion":
                part = scores[at:at + len(task.items)]
                at += len(task.items)
                out[task.name] = {"exact_match": part[:, 1].mean().item(), "items": len(task.items),
                                  "samples": [{"loglik": ll, "exact_match": bool(g)} for ll, g in part.tolist()]}
                continue
            samples, hits, hits_norm = [], 0, 0
            for item in task.items:
                ll = scores[at:at + len(item.choices), 0].tolist()
                at += len(item.choices)
                pred = _argmax(ll)
                pred_norm = _argmax([x / len(c) for x, c in zip(ll, item.choices)])
                hits, hits_norm = hits + (pred == item.gold), hits_norm + (pred_norm == item.gold)
                samples.append({"logliks": ll, "gold": item.gold, "pred": pred})
            n = len(task.items)
            out[task.name] = {"acc": hits / n, **({"acc_norm": hits_norm / n} if task.format == "cloze" else {}),
                              "items": n, "samples": samples}
        return out


def _argmax(values: list[float]) -> int:
    """Index of the largest value, the first on ties (as numpy's argmax, which lm-eval uses)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))
