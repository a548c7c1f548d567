"""DeepSpeed's private API is touched in `megamoe/deepspeed_adapter.py` only, for the DeepSpeed
version pyproject.toml pins; where an upgrade removed a private name, the run says so plainly."""

import re
import tomllib

import pytest

from megamoe import deepspeed_adapter
from megamoe.parallel.state import ParallelState
from runs import REPO

PACKAGE = REPO / "megamoe"
ADAPTER = PACKAGE / "deepspeed_adapter.py"
# DeepSpeed names that are private, or private module state, or the inside of its MoE layer
PRIVATE = re.compile(r"groups\._|groups\.mpu|_EXPERT_(DATA_)?PARALLEL_GROUP|\b_hp_mapping|\b_hp_optimizer|"
                     r"\b_lazy_init_hp|\b_global_grad_norm|enable_backward_allreduce|set_deepspeed_parallelism|"
                     r"deepspeed_moe\.|deepspeed_experts|\bgate\.wg\b|from deepspeed\.utils import groups")


def test_private_deepspeed_names_only_in_the_adapter():
    found = [f"{path.relative_to(REPO)}:{n}: {line.strip()}"
             for path in sorted(PACKAGE.rglob("*.py")) if path != ADAPTER
             for n, line in enumerate(path.read_text().splitlines(), 1) if PRIVATE.search(line)]
    assert not found, "move these into megamoe/deepspeed_adapter.py:\n" + "\n".join(found)
    assert PRIVATE.search(ADAPTER.read_text())  # the pattern does find what the adapter holds


def test_tested_version_is_the_pinned_one():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"deepspeed=={deepspeed_adapter.TESTED_VERSION}" in deps


def test_a_missing_private_name_names_the_tested_version(monkeypatch):
    from deepspeed.utils import groups
    monkeypatch.delattr(groups, "_EXPERT_PARALLEL_GROUP")
    state = ParallelState(world_size=2, rank=0, ep=2)  # expert groups are registered first
    with pytest.raises(deepspeed_adapter.DeepSpeedVersionError,
                       match=r"groups\._EXPERT_PARALLEL_GROUP.*tested with DeepSpeed 0\.19\.8"):
        deepspeed_adapter.initialize(None, None, state, {"zero_optimization": {"stage": 0}})
