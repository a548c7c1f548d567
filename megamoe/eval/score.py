"""Log-likelihood scoring of (context, continuation) pairs, batched through a model's forward.

Tokenisation and truncation follow lm-evaluation-harness's `hf` model, so the two give the same
numbers item by item (tests/test_eval_harness.py): whitespace that ends the context moves to the
continuation; context and continuation are encoded as a whole and the continuation is what
follows the context's own tokens; no BOS is added; a pair longer than the window keeps its last
`width + 1` tokens, and the model reads all but the last of them.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

# forward(tokens [rows, width], labels [rows, width]) -> [rows, 2]: per row, Σ log p(label) over
# the labels != -100, and 1.0 where each of them is the argmax (the greedy continuation), else
# 0.0; None on ranks that hold no logits (pipeline stages before the last).
Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]


@dataclass(frozen=True)
class Window:
    """One scored sequence: the model reads `tokens`; `labels` are -100 except the continuation."""
    tokens: list[int]
    labels: list[int]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), split the way lm-evaluation-harness splits them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole, ctx = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return ctx, whole[len(ctx):]


def make_window(context_ids: list[int], continuation_ids: list[int], width: int) -> Window:
    """The last `width + 1` tokens of context + continuation, as model input and shifted labels;
    the last min(len(continuation), width) labels are scored."""
    whole = (context_ids + continuation_ids)[-(width + 1):]
    tokens, targets = whole[:-1], whole[1:]
    n = min(len(continuation_ids), len(tokens))
    return Window(tokens, [-100] * (len(tokens) - n) + targets[len(targets) - n:])


def _pad(windows: list[Window], rows: int, width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, width] tokens and labels, right-padded (missing rows: padding only, nothing scored)."""
    tokens = torch.full((rows, width), pad_id, dtype=torch.long)
    labels = torch.full((rows, width), -100, dtype=torch.long)
    for i, w in enumerate(windows):
        tokens[i, :len(w.tokens)] = torch.tensor(w.tokens)
        labels[i, :len(w.labels)] = torch.tensor(w.labels)
    return tokens, labels


def batches(windows: list[Window], rows: int, width: int | None, pad_id: int, dp_rank: int = 0,
            dp: int = 1) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """This data-parallel rank's share of the windows as (indices, tokens, labels) batches.

    Longest first (less padding), batch k on rank k % dp. Every rank yields the same number of
    batches of `rows` rows (padding rows, and a padding batch at the end where the share is
    short), so ranks that meet in collectives (expert parallelism) run the same forwards.
    `width` None: each batch as wide as its longest window."""
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].tokens))
    chunks = [order[i:i + rows] for i in range(0, len(order), rows)]
    for k in range(dp_rank, -(-len(chunks) // dp) * dp, dp):
        idx = chunks[k] if k < len(chunks) else []
        mine = [windows[i] for i in idx]
        w = width or max([len(x.tokens) for x in mine], default=1)
        yield (idx, *_pad(mine, rows, w, pad_id))


def is_greedy(logits: torch.Tensor, labels: torch.Tensor, tp_group=None) -> torch.Tensor:
    """Per position [N]: no logit beats the label's (True where the label is -100). logits [N, V],
    or vocab-local [N, V/tp] under tensor parallelism over `tp_group`."""
    vocab = logits.shape[-1]
    local = labels - (dist.get_rank(tp_group) * vocab if tp_group is not None else 0)
    mine = (local >= 0) & (local < vocab)
    best = logits.float().max(-1).values  # [N]
    target = logits.float().gather(-1, local.masked_fill(~mine, 0).unsqueeze(-1)).squeeze(-1)
    target = target.masked_fill(~mine, float("-inf"))
    if tp_group is not None:  # the maxima over the whole vocabulary
        both = torch.stack([best, target])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=tp_group)
        best, target = both
    return (target >= best) | (labels == -100)


def row_scores(cross_entropy, logits: torch.Tensor, labels: torch.Tensor, tp_group=None) -> torch.Tensor:
    """logits [rows, width, V(/tp)] -> [rows, 2] (fp64): Σ log p over each row's labels != -100,
    and whether they are all greedy. `cross_entropy` sums a row's (`megamoe.train.loss`; the
    vocab-parallel one under TP)."""
    logliks = -torch.stack([cross_entropy(logits[i], labels[i]) for i in range(len(labels))])
    greedy = is_greedy(logits.flatten(0, 1), labels.flatten(), tp_group).view(labels.shape).all(-1)
    return torch.stack([logliks.double(), greedy.double()], -1)


def score(forward: Forward, windows: list[Window], rows: int, width: int | None, pad_id: int,
          dp_rank: int = 0, dp: int = 1, progress=None) -> torch.Tensor:
    """(log-likelihood, greedy) of every window [n, 2] (fp64, CPU); zeros where another rank or
    stage scored it, so a sum over data-parallel ranks and pipeline stages completes it."""
    out = torch.zeros(len(windows), 2, dtype=torch.float64)
    for idx, tokens, labels in batches(windows, rows, width, pad_id, dp_rank, dp):
        scores = forward(tokens, labels)
        if scores is not None and idx:
            out[idx] = scores[:len(idx)].cpu()
        if progress is not None:
            progress.update(len(idx))
    return out


def model_forward(model, cross_entropy, device: torch.device, tp_group=None) -> Forward:
    """The Forward of a model (or DeepSpeed engine) that holds the LM head: one call per batch."""
    def forward(tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return row_scores(cross_entropy, model(tokens.to(device)).logits, labels.to(device), tp_group)
    return forward
