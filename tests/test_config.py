"""Config: YAML + dotted overrides, typed; every bad value is one error naming key and fix."""

import pytest

from megamoe.config import Config, ConfigError, load_config

TINY = ["model.d_model=64", "model.n_layers=4", "model.n_heads=4", "model.vocab_size=512",
        "model.max_seq_len=64", "data.seq_length=64", "moe.num_experts=8", "moe.top_k=2"]


def cfg(*overrides: str) -> Config:
    return load_config(None, [*TINY, *overrides])


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 7\nmoe:\n  capacity_factor: 1.25\n")
    c = load_config(f, ["train.steps=9", "optim.lr=1e-3", "data.paths=[a, b]", "data.tokenizer=t.model",
                        "model.clip_qkv=null"])
    assert c.train.steps == 9 and c.moe.capacity_factor == 1.25 and c.optim.lr == 1e-3
    assert c.data.paths == ["a", "b"] and c.model.clip_qkv is None


def test_olmoe_preset_is_the_paper_model(tmp_path):
    c = Config.olmoe_1b_7b().validate(8)
    assert (c.moe.num_experts, c.moe.top_k, c.moe.ffn_hidden, c.model.d_model, c.model.n_layers) == (64, 8, 1024, 2048, 16)
    assert (c.moe.lb_loss_weight, c.moe.z_loss_weight, c.moe.norm_topk_prob) == (0.01, 0.001, False)
    assert load_config("configs/olmoe-1b-7b.yaml").validate(8).model.vocab_size == 50304
    sft = load_config("configs/olmoe-1b-7b-sft.yaml", ["data.paths=[d]", "data.tokenizer=t.json"]).validate(8)
    assert sft.optim.lr == 2e-5 and sft.grad_accumulation_steps(8) == 16


@pytest.mark.parametrize("overrides,key,fix", [
    (["trian.steps=1"], "trian", "did you mean train"),
    (["train.stepz=1"], "train.stepz", "did you mean train.steps"),
    (["train.steps=many"], "train.steps", "expected int"),
    (["train.steps"], "train.steps", "section.key=value"),
    (["moe.routing=random"], "moe.routing", "token_choice, expert_choice"),
    (["moe.lb_loss_scope=batch"], "moe.lb_loss_scope", "micro_batch, global_batch, sequence"),
    (["optim.offload=nvme"], "optim.offload", "none, cpu"),
    (["moe.expert_precision=fp4"], "moe.expert_precision", "model, fp8"),
    (["moe.expert_precision=fp8", "moe.ffn_hidden=40"], "moe.expert_precision", "divisible by 16"),
    (["moe.expert_precision=fp8", "moe.backend=deepspeed"], "moe.expert_precision", "moe.backend=megamoe"),
    (["optim.offload=cpu", "parallel.zero_stage=1"], "optim.offload", "set parallel.zero_stage=0"),
    (["train.gc_interval=-1"], "train.gc_interval", "0 = Python's automatic collector"),
    (["run.sample_prompt=@property"], "run.sample_prompt", "'@property' is not a YAML value"),
    (["data.paths=[a"], "data.paths", "write a list as [a, b]"),
    (["model.attention_mask=block"], "model.attention_mask", "causal, document"),
    (["train.profile_steps=[5]"], "train.profile_steps", "[first, last]"),
    (["train.profile_steps=[5, 4]"], "train.profile_steps", "1 <= first <= last"),
    (["train.profile_steps=[0, 4]"], "train.profile_steps", "1 <= first <= last"),
    (["train.steps=10", "train.profile_steps=[5, 11]"], "train.profile_steps", "last <= train.steps=10"),
    (["train.profile_ranks=[]"], "train.profile_ranks", "one or more rank numbers"),
])
def test_malformed_input_names_the_key(overrides, key, fix):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides).validate()
    assert key in str(e.value) and fix in str(e.value)


@pytest.mark.parametrize("overrides,world,key", [
    (["parallel.tensor=3"], 3, "parallel.tensor"),                      # heads % tp
    (["parallel.expert=3"], 3, "parallel.expert"),                      # experts % ep
    (["parallel.expert=16"], 16, "parallel.expert"),                    # ep > experts
    (["parallel.pipeline=3"], 3, "parallel.pipeline"),                  # layers % pp
    (["parallel.pipeline=8"], 8, "parallel.pipeline"),                  # pp > layers
    (["parallel.pipeline=2", "parallel.pipeline_layers=[1, 2]"], 2, "parallel.pipeline_layers"),
    (["parallel.sequence_parallel=true"], 1, "parallel.sequence_parallel"),
    (["parallel.tensor=2"], 3, "parallel"),                             # world % (tp·pp)
    (["parallel.expert=4"], 2, "parallel.expert"),                      # ep must divide dp
    (["train.global_batch_size=6", "train.micro_batch_size=4"], 2, "train.global_batch_size"),
    (["model.head_dim=7"], 1, "model.head_dim"),
    (["data.seq_length=128"], 1, "data.seq_length"),
    (["data.paths=[x]"], 1, "data.tokenizer"),
    (["moe.backend=deepspeed", "moe.routing=expert_choice"], 1, "moe.routing"),
    (["moe.top_k=9"], 1, "moe.top_k"),
    (["moe.dense_layers=[4]"], 1, "moe.dense_layers"),                  # no layer 4 of 4
    (["moe.dense_layers=[0, 1, 2, 3]"], 1, "moe.dense_layers"),         # every layer
    (["moe.num_experts=0", "moe.dense_layers=[0]"], 1, "moe.dense_layers"),
    (["moe.backend=deepspeed", "moe.lb_loss_scope=global_batch"], 1, "moe.lb_loss_scope"),
    (["train.profile_ranks=[0, 2]"], 2, "train.profile_ranks"),        # no rank 2 of 2
])
def test_impossible_values_are_refused(overrides, world, key):
    with pytest.raises(ConfigError) as e:
        cfg(*overrides).validate(world)
    assert str(e.value).startswith(key + ":"), str(e.value)


def test_a_sequence_longer_than_the_model_names_the_length_to_give():
    with pytest.raises(ConfigError, match=r"^data.seq_length: 128 exceeds model.max_seq_len=64; give "
                                          r"data.seq_length=64 or less"):
        cfg("data.seq_length=128").validate(1)


def test_valid_layouts_and_derived_sizes():
    c = cfg("parallel.tensor=2", "parallel.pipeline=2", "parallel.expert=2",
            "train.global_batch_size=16", "train.micro_batch_size=2").validate(16)
    assert c.data_parallel_size(16) == 4 and c.grad_accumulation_steps(16) == 2


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
