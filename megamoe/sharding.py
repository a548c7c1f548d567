"""How a local parameter relates to its full (layout-free) tensor.

A parallel transform that cuts a parameter records `(dim, index, count)` on it: the local
tensor is chunk `index` of `count` equal chunks of the full tensor along `dim`. Several cuts
compose (applied in order). Initialisation, checkpoints and conversion all go through these
two functions, so every layout reads and writes the same canonical tensors.
"""

import torch

_ATTR = "_megamoe_shards"


def mark_shard(param: torch.Tensor, dim: int, index: int, count: int) -> None:
    if count > 1:
        setattr(param, _ATTR, getattr(param, _ATTR, ()) + ((dim, index, count),))


def shards(param: torch.Tensor) -> tuple[tuple[int, int, int], ...]:
    return getattr(param, _ATTR, ())


def full_shape(param: torch.Tensor) -> torch.Size:
    shape = list(param.shape)
    for dim, _, count in shards(param):
        shape[dim] *= count
    return torch.Size(shape)


def local_slice(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's piece of `full`, for a parameter shaped and marked like `param`."""
    for dim, index, count in shards(param):  # in the order the cuts were made
        size = full.shape[dim] // count
        full = full.narrow(dim, index * size, size)
    return full


def shard_parameter(module: torch.nn.Module, name: str, dim: int, index: int, count: int) -> None:
    """Replace module.<name> by its chunk `index` of `count` along `dim`, and mark it."""
    old = getattr(module, name)
    size = old.shape[dim] // count
    new = torch.nn.Parameter(old.detach().narrow(dim, index * size, size).clone(),
                             requires_grad=old.requires_grad)
    for attr, value in vars(old).items():
        setattr(new, attr, value)
    mark_shard(new, dim, index, count)
    setattr(module, name, new)
