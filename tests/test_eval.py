"""Downstream evaluation (issue 13): task files, lm-eval's tokenisation, batched log-likelihoods,
the built-in task, the evaluation in the training loop and `megamoe-eval`.

One real run (1 rank, 200 steps of a tiny model, `next_line` scored at the end) is shared by the
tests that need a trained model; the parallel layouts are in tests/test_parallel_matrix.py.
"""

import json

import pytest
import torch

from megamoe.config import Config, ConfigError, DataConfig, ModelConfig, MoEConfig, TrainConfig
from megamoe.eval.cli import evaluate, main
from megamoe.eval.evaluator import Evaluator
from megamoe.eval.score import encode_pair, make_window, model_forward
from megamoe.eval.tasks import Item, Task, TaskError, letter_format, load_task
from megamoe.eval.training import TrainingEvaluator
from megamoe.model.olmoe import OLMoE, init_weights
from megamoe.train.sample import load_model, tokenizer_for
from runs import launch, metrics

ITEMS = 120  # 30 groups of four: chance is 0.25 ± 0.04
TRAINED = ["model.max_seq_len=64", "data.seq_length=64", "model.d_model=64", "train.micro_batch_size=8",
           "optim.warmup_steps=20", "train.steps=200", "train.eval_interval=200", "train.eval_tasks=[next_line]",
           f"train.eval_limit={ITEMS}", "run.tensorboard=true"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    proc = launch(run, 1, TRAINED)
    return run, proc.stdout


class Chars:
    """A tokenizer of one id per character (enough to test splitting, padding and batching)."""
    pad_id = 0

    def encode(self, text):
        return [1 + ord(c) % 95 for c in text]


def tiny_model(max_seq_len=64) -> OLMoE:
    cfg = Config(model=ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, max_seq_len=max_seq_len),
                 moe=MoEConfig(num_experts=4, top_k=2, ffn_hidden=16), data=DataConfig(seq_length=32)).validate()
    model = OLMoE(cfg)
    init_weights(model, std=0.2, seed=0)
    return model.eval()


def test_trailing_whitespace_of_the_context_moves_to_the_continuation():
    assert encode_pair(Chars(), "ab \n", "cd") == (Chars().encode("ab"), Chars().encode(" \ncd"))


def test_window_keeps_the_last_tokens_and_scores_the_continuation():
    w = make_window([1, 2, 3, 4], [5, 6], width=8)
    assert w.tokens == [1, 2, 3, 4, 5] and w.labels == [-100, -100, -100, 5, 6]
    w = make_window([1, 2, 3, 4], [5, 6], width=3)  # lm-eval: the last width + 1 tokens, minus the last
    assert w.tokens == [3, 4, 5] and w.labels == [-100, 5, 6]
    w = make_window([1], [5, 6, 7, 8], width=2)  # continuation longer than the window: its tail
    assert w.tokens == [6, 7] and w.labels == [7, 8]


@torch.no_grad()
def test_batched_loglikelihoods_are_each_pair_scored_alone():
    model = tiny_model()
    items = [Item("def f(x):\n", ("    return x", "    pass", "import os"), 0),
             Item("a = 1", (" + 2", "; b = 22222", " * a"), 2),
             Item("x", ("y", "zz"), 1)]
    task = Task("t", "cloze", tuple(items))
    ev = Evaluator([task], Chars(), width=64)
    got = ev.loglikelihoods(model_forward(model, model.loss_fn, torch.device("cpu")), rows=4, width=None)
    want = []
    for item in items:
        for choice in item.choices:
            ctx, cont = encode_pair(Chars(), item.context, choice)
            logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].double(), -1)
            want.append(sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    # data-parallel shares: each rank scores some windows, their sum is the whole
    shares = [ev.loglikelihoods(model_forward(model, model.loss_fn, torch.device("cpu")), 2, 64, r, 3)
              for r in range(3)]
    assert all((s != 0).sum() < len(want) for s in shares)
    torch.testing.assert_close(sum(shares), got, rtol=1e-5, atol=1e-5)


def test_accuracy_and_per_character_accuracy():
    items = (Item("q", (" a", " bbbb"), 1), Item("q", (" a", " bbbb"), 0))
    ev = Evaluator([Task("t", "cloze", items)], Chars(), width=16)
    # item 1: raw prefers " a" (-2 > -4), per char prefers " bbbb" (-4/5 > -2/2); item 2 the same
    res = ev.results(torch.tensor([-2.0, -4.0, -2.0, -4.0], dtype=torch.float64))["t"]
    assert (res["acc"], res["acc_norm"], res["items"]) == (0.5, 0.5, 2)
    assert [s["pred"] for s in res["samples"]] == [0, 0]


def test_letter_format_lists_the_choices_and_answers_with_a_letter():
    item = letter_format(Item("Which is red?\n", (" sky", " blood", " grass"), 1))
    assert item.context == "Which is red?\n A. sky\n B. blood\n C. grass\nAnswer:"
    assert item.choices == (" A", " B", " C") and item.gold == 1


def test_task_files_and_specs(tmp_path):
    path = tmp_path / "arc.jsonl"
    path.write_text(json.dumps({"context": "Q?", "choices": [" x", " y"], "gold": 1}) + "\n\n"
                    + json.dumps({"context": "R?", "choices": [" x", " y", " z"], "gold": 0}) + "\n")
    task = load_task(str(path))
    assert (task.name, task.format, len(task.items), task.items[1].choices) == ("arc", "cloze", 2, (" x", " y", " z"))
    mc = load_task(f"{path}:mc", limit=1)
    assert (mc.name, mc.format, len(mc.items), mc.items[0].choices) == ("arc_mc", "mc", 1, (" A", " B"))


@pytest.mark.parametrize("line,message", [
    ('{"context": "Q", "choices": [" a", " b"], "gold": 2}', "arc.jsonl:1: 'gold' must be an index"),
    ('{"context": "", "choices": [" a", " b"], "gold": 0}', "arc.jsonl:1: 'context' must be a non-empty"),
    ('{"context": "Q", "choices": " a", "gold": 0}', "arc.jsonl:1: 'choices' must be a list"),
    ('{"context": "Q", "choices": [" a", " b"], "gold": 0', "arc.jsonl:1: not valid JSON"),
])
def test_bad_items_are_named_with_file_and_line(tmp_path, line, message):
    path = tmp_path / "arc.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(TaskError, match=message.replace("[", r"\[")):
        load_task(str(path))


def test_unknown_specs_and_missing_files_are_refused(tmp_path):
    with pytest.raises(TaskError, match="neither a built-in task"):
        load_task("hellaswag")
    with pytest.raises(TaskError, match="does not exist"):
        load_task(str(tmp_path / "none.jsonl"))


def test_next_line_is_deterministic_and_balanced():
    items = load_task("next_line", limit=40).items
    assert items == load_task("next_line").items[:40]  # the first N items do not depend on N
    assert [i.gold for i in items] == [0, 1, 2, 3] * 10  # each group: one item per indentation
    for item in items:
        assert len({c.lstrip() for c in item.choices}) == 1 and item.context.endswith("\n")


def test_trained_model_beats_chance_and_a_random_one_does_not(trained):
    run, _ = trained
    model, _ = load_model(run)
    acc = metrics(run)[-1]["task/next_line/acc"]  # scored by the loop at the last step
    assert acc > 0.25 + 3 * 0.04, acc
    random_model = OLMoE(model.cfg)
    init_weights(random_model, model.cfg.model.init_std, seed=1)
    ev = Evaluator([load_task("next_line", ITEMS)], tokenizer_for(model.cfg), model.cfg.model.max_seq_len)
    with torch.no_grad():
        logliks = ev.loglikelihoods(model_forward(random_model.eval(), random_model.loss_fn, torch.device("cpu")), 8, None)
    assert abs(ev.results(logliks)["next_line"]["acc"] - 0.25) < 2 * 0.04


def test_the_loop_logs_each_task_to_metrics_console_and_tensorboard(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run, stdout = trained
    last = metrics(run)[-1]
    offline = evaluate(run, ["next_line"], limit=ITEMS, batch_size=8)["tasks"]["next_line"]
    assert last["step"] == 200 and last["task/next_line/acc"] == offline["acc"]
    assert last["task/next_line/acc_norm"] == offline["acc_norm"]
    assert f"next_line/acc {offline['acc']:.3f}" in stdout.splitlines()[-1]
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert events.Scalars("train/task/next_line/acc")[-1].value == pytest.approx(offline["acc"])


def test_eval_tasks_are_checked_by_the_config_and_read_by_the_trainer(tmp_path):
    with pytest.raises(ConfigError, match="train.eval_tasks: 'hellaswag' is neither"):
        Config(train=TrainConfig(eval_tasks=["hellaswag"])).validate()
    with pytest.raises(ConfigError, match="train.eval_limit"):
        Config(train=TrainConfig(eval_limit=0)).validate()
    cfg = Config(train=TrainConfig(eval_tasks=[f"{tmp_path}/none.jsonl"])).validate()
    with pytest.raises(ConfigError, match="train.eval_tasks: task file .* does not exist"):
        TrainingEvaluator(cfg, state=None, tokenizer=None)  # the Trainer makes it before the model


def test_cli_writes_a_json_result_and_refuses_to_overwrite(trained, tmp_path, capsys):
    run, _ = trained
    out = tmp_path / "result.json"
    assert main([str(run), "--tasks", "next_line", "next_line:mc", "--limit", "8", "--samples",
                 "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert result["step"] == 200 and set(result["tasks"]) == {"next_line", "next_line_mc"}
    assert "acc_norm" not in result["tasks"]["next_line_mc"] and result["tasks"]["next_line"]["items"] == 8
    assert [len(s["logliks"]) for s in result["tasks"]["next_line"]["samples"]] == [4] * 8
    with pytest.raises(SystemExit):
        main([str(run), "--tasks", "next_line", "--output", str(out)])
    assert "exists" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "Q"}\n')  # the task is read before the (missing) checkpoint
    assert main([str(tmp_path / "no-run"), "--tasks", str(bad)]) == 2
    assert capsys.readouterr().err.startswith(f"megamoe: error: {bad}:1: 'choices' must be")
