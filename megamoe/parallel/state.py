"""Process groups for every parallel dimension, built once and passed explicitly.

Rank layout (tensor fastest, then data, then pipeline, as Megatron):
    rank = pp_rank · (dp · tp) + dp_rank · tp + tp_rank
Experts are sharded over EP groups taken inside data parallelism: dp_rank = edp_rank · ep + ep_rank,
so an EP group is `ep` consecutive DP ranks and expert-data-parallel (EDP) links the ranks
holding the same experts. DeepSpeed sees these groups through `megamoe.deepspeed_adapter`.
"""

from dataclasses import dataclass

import torch.distributed as dist


@dataclass
class ParallelState:
    world_size: int
    rank: int
    tp: int = 1
    pp: int = 1
    ep: int = 1

    def __post_init__(self):
        assert self.world_size % (self.tp * self.pp) == 0
        self.dp = self.world_size // (self.tp * self.pp)
        assert self.dp % self.ep == 0
        self.edp = self.dp // self.ep
        r = self.rank
        self.tp_rank = r % self.tp
        self.dp_rank = (r // self.tp) % self.dp
        self.pp_rank = r // (self.tp * self.dp)
        self.ep_rank = self.dp_rank % self.ep
        self.edp_rank = self.dp_rank // self.ep
        self.tp_group = self.dp_group = self.pp_group = self.ep_group = self.edp_group = None
        self.mp_group = None  # tp × pp: ranks sharing one data-parallel replica
        self.pp_ranks: list[int] = [self.rank]

    def _rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        return pp_rank * self.dp * self.tp + dp_rank * self.tp + tp_rank

    def build_groups(self) -> "ParallelState":
        """Create every process group (collective: all ranks must call it in the same order)."""
        if self.world_size == 1:
            return self
        coords = [(p, d, t) for p in range(self.pp) for d in range(self.dp) for t in range(self.tp)]

        def build(key_fn):
            """One group per value of key_fn(coord); returns (the group and ranks holding self)."""
            buckets: dict = {}
            for c in coords:
                buckets.setdefault(key_fn(*c), []).append(self._rank_of(*c))
            mine = None
            for ranks in buckets.values():
                group = dist.new_group(ranks)
                if self.rank in ranks:
                    mine = (group, ranks)
            return mine

        self.tp_group, _ = build(lambda p, d, t: (p, d))
        self.dp_group, _ = build(lambda p, d, t: (p, t))
        self.pp_group, self.pp_ranks = build(lambda p, d, t: (d, t))
        self.mp_group, _ = build(lambda p, d, t: d)
        self.ep_group, _ = build(lambda p, d, t: (p, t, d // self.ep))
        self.edp_group, _ = build(lambda p, d, t: (p, t, d % self.ep))
        return self

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def describe(self) -> str:
        return (f"world {self.world_size} = pp {self.pp} × dp {self.dp} × tp {self.tp}; "
                f"ep {self.ep} (expert-dp {self.edp})")
