"""All-reduce for the trainer's bookkeeping tensors: logged losses, expert loads, norms, flags.

These live on the CPU or, for the step's statistics (`megamoe.train.stats`), on the model's
device; NCCL reduces only CUDA tensors and gloo only CPU ones. `all_reduce` moves a tensor to where the group's backend needs it and
returns the result where the tensor was. Activations and gradients never come here: they
are already on the model's device (mappings.py, dispatch.py).
"""

import torch
import torch.distributed as dist


def collective_device(group=None) -> torch.device:
    """The device a collective over `group` takes: this rank's GPU under NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(t: torch.Tensor, group=None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """`op` of `t` over `group`, as a new tensor on `t`'s device (`t` itself with one rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return t
    x = t.to(collective_device(group), copy=True)
    dist.all_reduce(x, op=op, group=group)
    return x.to(t.device)
