"""Downstream evaluation (issue 13): task files, lm-eval's tokenisation, batched log-likelihoods,
the built-in task, the evaluation in the training loop and `megamoe-eval`.

One real run (1 rank, 400 steps of a tiny model, `next_line` scored at the end) is shared by the
tests that need a trained model; the parallel layouts are in tests/test_parallel_matrix.py.
"""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from megamoe.checkpoint.hf_dirs import export_hf
from megamoe.config import Config, ConfigError, DataConfig, ModelConfig, MoEConfig, TrainConfig
from megamoe.eval.cli import evaluate, main
from megamoe.eval.evaluator import Evaluator
from megamoe.eval.score import encode_pair, is_greedy, make_window, model_forward
from megamoe.eval.tasks import Item, Task, TaskError, letter_format, load_task
from megamoe.eval.training import TrainingEvaluator
from megamoe.inference.load import load_model, tokenizer_for
from megamoe.model.olmoe import OLMoE, init_weights
from megamoe.train.loss import cross_entropy
from distributed import run_ranks
from pip_cache import pip_target
from runs import launch, metrics

ITEMS = 120  # 30 groups of four: chance is 0.25 ± 0.04
TRAINED = ["model.max_seq_len=64", "data.seq_length=64", "model.d_model=64", "train.micro_batch_size=8",
           "optim.warmup_steps=20", "train.steps=400", "train.eval_interval=400", "train.eval_tasks=[next_line]",
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
        return [1 + (ord(c) - 32) % 95 for c in text]

    def decode(self, ids):  # printable ASCII
        return "".join(chr(i - 1 + 32) for i in ids)


def tiny_model(max_seq_len=64) -> OLMoE:
    cfg = Config(model=ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, max_seq_len=max_seq_len),
                 moe=MoEConfig(num_experts=4, top_k=2, ffn_hidden=16), data=DataConfig(seq_length=32)).validate()
    model = cfg.model.build(cfg.moe)
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
    got = ev.scores(model_forward(model, cross_entropy, torch.device("cpu")), rows=4, width=None)
    want = []
    for item in items:
        for choice in item.choices:
            ctx, cont = encode_pair(Chars(), item.context, choice)
            logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].double(), -1)
            scored = logp[len(ctx) - 1:len(ctx) - 1 + len(cont)]  # the positions predicting cont
            want.append([scored[range(len(cont)), cont].sum().item(),
                         float((scored.argmax(-1) == torch.tensor(cont)).all())])
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    # data-parallel shares: each rank scores some windows, their sum is the whole
    shares = [ev.scores(model_forward(model, cross_entropy, torch.device("cpu")), 2, 64, r, 3) for r in range(3)]
    assert all((s[:, 0] != 0).sum() < len(want) for s in shares)
    torch.testing.assert_close(sum(shares), got, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_completion_is_an_exact_match_of_the_greedy_continuation(tmp_path):
    model, context = tiny_model(), "def f(x):"
    ids = Chars().encode(context)
    for _ in range(4):  # greedy decoding, one token at a time
        ids.append(int(model(torch.tensor([ids])).logits[0, -1, 1:].argmax()) + 1)  # id 0 is padding
    answer = Chars().decode(ids[len(context):])
    path = tmp_path / "gen.jsonl"
    path.write_text("".join(json.dumps({"context": context, "answer": a}) + "\n"
                            for a in (answer, answer[:-1] + chr(33 + (ord(answer[-1]) - 32) % 94))))
    task = load_task(str(path))
    ev = Evaluator([task], Chars(), width=64)
    result = ev.results(ev.scores(model_forward(model, cross_entropy, torch.device("cpu")), 2, None))["gen"]
    assert task.format == "completion" and [s["exact_match"] for s in result["samples"]] == [True, False]
    assert result["exact_match"] == 0.5
    with pytest.raises(TaskError, match="no letter format"):
        load_task(f"{path}:mc")


def _greedy_over_tp(rank, world_size, logits, labels):
    return is_greedy(logits.chunk(world_size, -1)[rank], labels, tp_group=dist.group.WORLD)


def test_greedy_check_over_a_vocabulary_cut_by_tensor_parallelism():
    logits = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    labels = torch.cat([logits[:32].argmax(-1), torch.randint(0, 96, (31,)), torch.tensor([-100])])
    want = is_greedy(logits, labels)
    assert want[:32].all() and want[-1] and not want[32:-1].all()
    for got in run_ranks(_greedy_over_tp, 2, logits, labels):
        assert torch.equal(got, want)


def test_accuracy_and_per_character_accuracy():
    items = (Item("q", (" a", " bbbb"), 1), Item("q", (" a", " bbbb"), 0))
    ev = Evaluator([Task("t", "cloze", items)], Chars(), width=16)
    # item 1 (gold 1): raw prefers " a" (-2 > -4), per character " bbbb" (-4/5 > -2/2): wrong, right;
    # item 2 (gold 0): " a" both ways (-1 > -4, -1/2 > -4/5): right, right
    scores = torch.tensor([[-2.0, 0], [-4.0, 0], [-1.0, 0], [-4.0, 0]], dtype=torch.float64)
    res = ev.results(scores)["t"]
    assert (res["acc"], res["acc_norm"], res["items"]) == (0.5, 1.0, 2)
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
    _, cfg = load_model(run)
    acc = metrics(run)[-1]["task/next_line/acc"]  # scored by the loop at the last step
    assert acc > 0.25 + 3 * 0.04, acc
    random_model = cfg.model.build(cfg.moe)
    init_weights(random_model, cfg.model.init_std, seed=1)
    ev = Evaluator([load_task("next_line", ITEMS)], tokenizer_for(cfg), cfg.model.max_seq_len)
    with torch.no_grad():
        scores = ev.scores(model_forward(random_model.eval(), cross_entropy, torch.device("cpu")), 8, None)
    assert abs(ev.results(scores)["next_line"]["acc"] - 0.25) < 2 * 0.04


def test_the_loop_logs_each_task_to_metrics_console_and_tensorboard(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run, stdout = trained
    last = metrics(run)[-1]
    offline = evaluate(run, ["next_line"], limit=ITEMS, batch_size=8)["tasks"]["next_line"]
    assert last["step"] == 400 and last["task/next_line/acc"] == offline["acc"]
    assert last["task/next_line/acc_norm"] == offline["acc_norm"]
    last_step_line = [line for line in stdout.splitlines() if line.startswith("step ")][-1]
    assert f"next_line/acc {offline['acc']:.3f}" in last_step_line
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
    assert result["step"] == 400 and set(result["tasks"]) == {"next_line", "next_line_mc"}
    assert "acc_norm" not in result["tasks"]["next_line_mc"] and result["tasks"]["next_line"]["items"] == 8
    assert [len(s["logliks"]) for s in result["tasks"]["next_line"]["samples"]] == [4] * 8
    with pytest.raises(SystemExit):
        main([str(run), "--tasks", "next_line", "--output", str(out)])
    assert "exists" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "Q"}\n')  # the task is read before the (missing) checkpoint
    assert main([str(tmp_path / "no-run"), "--tasks", str(bad)]) == 2
    assert capsys.readouterr().err.startswith(f"megamoe: error: {bad}:1: 'choices' must be")


# lm-evaluation-harness 0.4.13 with its `hf` extra, beside the suite's torch and transformers: the
# packages it needs that a fresh install of megamoe[test] does not hold (what `pip install --dry-run
# --report` resolved for `lm_eval[hf]==0.4.13` with torch pinned, in a fresh venv, 2026-11-24),
# pinned, installed without dependencies into .cache/ once (tests/pip_cache.py: pip never touches torch).
LM_EVAL = ["lm_eval==0.4.13", "accelerate==1.15.0", "aiohappyeyeballs==2.7.1", "aiohttp==3.14.5",
           "aiosignal==1.4.0", "attrs==26.1.0", "certifi==2026.10.19.post1", "chardet==6.0.0.post1",
           "charset-normalizer==3.5.2", "cloudpickle==3.1.3", "colorama==0.4.6", "DataProperty==1.1.1",
           "datasets==5.2.0", "defusedxml==0.7.1", "dill==0.4.1", "evaluate==0.4.6", "frozenlist==1.8.0",
           "joblib==1.6.0", "lxml==6.1.3", "mbstrdecoder==1.1.5", "more-itertools==11.2.1",
           "multidict==7.2.1", "multiprocess==0.70.19", "narwhals==2.29.0", "nltk==3.10.4", "pandas==3.1.1",
           "pathvalidate==3.3.1", "peft==0.21.2", "portalocker==4.4.2", "propcache==0.5.4",
           "pyarrow==26.0.1", "pytablewriter==1.2.1", "python-dateutil==2.9.0.post0", "pytz==2026.6",
           "requests==2.34.2", "rouge_score==0.1.2", "sacrebleu==2.6.0", "scikit-learn==1.9.1",
           "scipy==1.17.1", "six==1.17.0", "sqlitedict==2.1.0", "tabledata==1.3.5", "tabulate==0.10.0",
           "tcolorpy==0.1.7", "threadpoolctl==3.8.0", "typepy==1.3.5", "urllib3==2.8.0", "word2number==1.1",
           "xxhash==4.1.0", "yarl==1.25.1"]

_TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def lm_eval_path():
    """PYTHONPATH entry holding lm-evaluation-harness; pip-installed into .cache/ on first use."""
    return pip_target(LM_EVAL)


def write_items(path, items):
    path.write_text("".join(json.dumps({"context": i.context, "choices": list(i.choices), "gold": i.gold}) + "\n"
                            for i in items))
    return path


def test_lm_evaluation_harness_agrees_item_by_item(trained, tmp_path, lm_eval_path):
    """The same JSONL through lm-eval's `hf` model over a to-hf export: the same log-likelihood of
    every choice (so the same acc and acc_norm), in the cloze and the letter format."""
    run, _ = trained
    hf = export_hf(run, tmp_path / "hf", progress=False)
    items = load_task("next_line", limit=24).items  # contexts longer than the window: truncated alike
    cloze = write_items(tmp_path / "cloze.jsonl", items)
    letters = write_items(tmp_path / "letters.jsonl", [letter_format(i) for i in items])
    (tmp_path / "tasks").mkdir()
    for name, path in (("megamoe_cloze", cloze), ("megamoe_letters", letters)):
        (tmp_path / "tasks" / f"{name}.yaml").write_text(_TASK_YAML.format(name=name, path=path))
    env = {**os.environ, "PYTHONPATH": str(lm_eval_path), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf-home"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={hf},max_length=64,dtype=float32", "--device", "cpu", "--batch_size", "8",
                           "--tasks", "megamoe_cloze,megamoe_letters", "--include_path", str(tmp_path / "tasks"),
                           "--log_samples", "--output_path", str(tmp_path / "out")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ours = evaluate(run, [str(cloze), str(letters)], batch_size=8, samples=True)["tasks"]
    (results,) = glob.glob(str(tmp_path / "out" / "*" / "results_*.json"))
    theirs = json.loads(open(results).read())["results"]
    for name, mine in (("megamoe_cloze", ours["cloze"]), ("megamoe_letters", ours["letters"])):
        (samples,) = glob.glob(str(tmp_path / "out" / "*" / f"samples_{name}_*.jsonl"))
        docs = sorted((json.loads(line) for line in open(samples)), key=lambda d: d["doc_id"])
        assert len(docs) == len(items)
        for doc, sample in zip(docs, mine["samples"]):
            lls = [float(ll) for ll, _ in doc["filtered_resps"]]
            assert lls == pytest.approx(sample["logliks"], abs=1e-4), doc["doc_id"]
        assert theirs[name]["acc,none"] == mine["acc"] and theirs[name]["acc_norm,none"] == mine["acc_norm"]
