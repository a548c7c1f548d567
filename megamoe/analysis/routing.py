"""Routing statistics: how evenly experts are used, and how they specialise by domain.

The embedded corpus has two domains (Python code and English docstrings); running each
through a trained model and counting the top-k assignments per expert shows what OLMoE's
paper measures: load balance per layer, and domain specialisation per expert (the share of an
expert's tokens that come from a domain, over that domain's share of all tokens: 1 = none).
"""

import torch

from ..data.corpus import iter_stdlib_documents


@torch.no_grad()
def expert_counts(model, batches: list[torch.Tensor]) -> torch.Tensor:
    """[layers, experts] top-k assignments of every MoE layer over `batches` ([B, S] tokens)."""
    model.eval()
    layers = model.moe_layers()
    counts = torch.zeros(len(layers), model.cfg.moe.num_experts, dtype=torch.float64)
    for tokens in batches:
        model(tokens)
        for i, layer in enumerate(layers):
            counts[i] += layer.stats["expert_load"].double().cpu()
    return counts


def domain_batches(tokenizer, domain: str, num_tokens: int, seq_len: int,
                   max_bytes: int | None = None) -> list[torch.Tensor]:
    """[1, seq_len] token batches of one corpus domain, `num_tokens` in all (at most)."""
    stream: list[int] = []
    for doc in iter_stdlib_documents(max_bytes):
        if doc["domain"] == domain:
            stream += tokenizer.encode(doc["text"]) + [tokenizer.eos_id]
            if len(stream) >= num_tokens:
                break
    usable = min(len(stream), num_tokens) // seq_len * seq_len
    if usable == 0:
        raise ValueError(f"--tokens must be at least one sequence ({seq_len} tokens) of {domain!r}")
    return list(torch.tensor(stream[:usable]).view(-1, 1, seq_len))


def report(counts: dict[str, torch.Tensor]) -> dict:
    """Per layer: load imbalance (max/mean share) and per-expert specialisation by domain."""
    total = sum(counts.values())  # [L, E]
    domain_share = {d: float(c.sum() / total.sum()) for d, c in counts.items()}
    layers = []
    for i in range(total.shape[0]):
        share = total[i] / total[i].sum()
        expert_tokens = total[i].clamp_min(1e-12)
        layers.append({
            "layer": i,
            "imbalance": float(share.max() * share.numel()),
            "share": share.tolist(),
            "specialisation": {d: ((c[i] / expert_tokens) / domain_share[d]).tolist()
                               for d, c in counts.items()},
        })
    return {"domain_share": domain_share, "layers": layers}


def format_report(rep: dict) -> str:
    """A table a person reads: one line per layer, the most specialised expert per domain."""
    lines = ["tokens by domain: " + ", ".join(f"{d} {s:.1%}" for d, s in rep["domain_share"].items()),
             "layer  imbalance(max/mean)  most specialised expert per domain (ratio to base rate)"]
    for layer in rep["layers"]:
        best = []
        for d, spec in layer["specialisation"].items():
            e = max(range(len(spec)), key=spec.__getitem__)
            best.append(f"{d}: expert {e} ×{spec[e]:.2f}")
        lines.append(f"{layer['layer']:>5}  {layer['imbalance']:>19.2f}  " + "; ".join(best))
    return "\n".join(lines)
