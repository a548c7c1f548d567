"""The OLMoE paper's routing analyses (§5), on the top-k choices a model makes on given tokens.

`record_choices` runs token batches through a 1-rank model and keeps, per MoE layer, every
token's k chosen experts ([N, k], the choice before any capacity dropping). From those:
  router saturation        share of a checkpoint's top-k that the final checkpoint also picks,
                           per layer (1 = the routing has settled)
  co-activation            [E, E] per layer: P(expert j chosen | expert i chosen), diagonal 0
  domain specialisation    share of an expert's assignments from a domain over that domain's
                           share of all tokens (1 = no specialisation); `routing.report`
  vocabulary specialisation  per expert, the token ids most often routed to it: count(v to e)
                           / count(v), among tokens seen at least `min_count` times
"""

from collections.abc import Iterable

import torch
from tqdm import tqdm

from ..moe.router import Router


@torch.no_grad()
def record_choices(model, batches: Iterable[torch.Tensor], progress: bool = False,
                   desc: str = "routing") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(token ids [N], per MoE layer the top-k experts of each token [N, k]) over `batches`
    ([B, S] token tensors). Capacity routing is measured dropless: what the router chose."""
    routers = [m for m in model.modules() if isinstance(m, Router)]
    if any(r.routing != "token_choice" for r in routers):
        raise ValueError("the routing analyses need token-choice routing (each token picks its "
                         "top-k); expert choice has no per-token top-k")
    kept = [r.capacity_factor for r in routers]
    seen: list[list[torch.Tensor]] = [[] for _ in routers]
    hooks = [r.register_forward_hook(lambda mod, args, out, i=i: seen[i].append(
        out.expert_idx.view(-1, mod.top_k).cpu())) for i, r in enumerate(routers)]
    tokens = []
    model.eval()
    try:
        for r in routers:
            r.capacity_factor = None
        for batch in tqdm(list(batches), desc=desc, unit="batch", disable=not progress):
            model(batch)
            tokens.append(batch.reshape(-1).cpu())
    finally:
        for r, cf in zip(routers, kept):
            r.capacity_factor = cf
        for h in hooks:
            h.remove()
    return torch.cat(tokens), [torch.cat(s) for s in seen]


def expert_counts(choices: list[torch.Tensor], num_experts: int) -> torch.Tensor:
    """[layers, E] assignments per expert."""
    return torch.stack([torch.bincount(c.reshape(-1), minlength=num_experts) for c in choices]).double()


def router_saturation(choices: list[torch.Tensor], final: list[torch.Tensor]) -> list[float]:
    """Per layer: mean over tokens of |top-k here ∩ top-k of the final checkpoint| / k."""
    out = []
    for a, b in zip(choices, final):
        same = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1)  # [N, k]: a's pick also among b's
        out.append(same.double().mean().item())
    return out


def coactivation(choices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E, E]: row i, column j = share of the tokens choosing expert i that also choose j."""
    hot = torch.zeros(choices.shape[0], num_experts, dtype=torch.float64)
    hot.scatter_(1, choices, 1.0)  # [N, E] multi-hot
    both = hot.t() @ hot  # [E, E] tokens choosing i and j
    both.fill_diagonal_(0)
    return both / hot.sum(0).clamp_min(1).unsqueeze(1)


def vocab_specialisation(tokens: torch.Tensor, choices: torch.Tensor, num_experts: int, top: int = 5,
                         min_count: int = 1) -> list[list[tuple[int, float]]]:
    """Per expert, up to `top` (token id, share of that token's occurrences routed to it), highest
    share first (ties: lower id), among token ids seen at least `min_count` times."""
    vocab = int(tokens.max()) + 1
    seen = torch.bincount(tokens, minlength=vocab).double()  # [V]
    routed = torch.zeros(num_experts, vocab, dtype=torch.float64)
    k = choices.shape[1]
    ones = torch.ones(choices.numel(), dtype=torch.float64)
    routed.index_put_((choices.reshape(-1), tokens.repeat_interleave(k)), ones, accumulate=True)  # [E, V]
    share = routed / seen.clamp_min(1)
    share[:, seen < min_count] = -1  # never picked
    values, ids = torch.sort(share, dim=1, descending=True, stable=True)  # stable: ties by id
    return [[(int(v), float(s)) for v, s in zip(ids[e, :top], values[e, :top]) if s > 0]
            for e in range(num_experts)]
