"""Fine-tuning on prompt/completion data: only completion tokens are targets, and every target
of a step weighs the same, in any layout and any split into micro-batches."""

import json

import pytest
import torch
import torch.nn.functional as F

from megamoe.config import load_config
from megamoe.data.corpus import iter_stdlib_documents
from megamoe.data.dataset import build_datasets, get_batch
from megamoe.data.prepare import ensure_default_corpus, preprocess
from megamoe.inference.load import load_model
from runs import CORPUS_CACHE, TINY, assert_same_run, launch, metrics


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    """Prompt/completion pairs cut from stdlib documents at varied points, so micro-batches
    hold different numbers of targets; tokenized with the tiny runs' tokenizer."""
    root = tmp_path_factory.mktemp("sft")
    _, tokenizer = ensure_default_corpus(CORPUS_CACHE, vocab_size=512)
    with open(root / "pairs.jsonl", "w") as f:
        for i, doc in enumerate(iter_stdlib_documents(max_bytes=300_000)):
            text = doc["text"][:400]
            cut = [0, 20, 60, 150, 300][i % 5] if len(text) > 320 else len(text) // 3
            f.write(json.dumps({"prompt": text[:cut], "completion": text[cut:]}) + "\n")
    preprocess([root / "pairs.jsonl"], root / "pairs", tokenizer, json_key="completion",
               prompt_key="prompt", progress=False)
    return [f"data.paths=[{root / 'pairs'}]", f"data.tokenizer={tokenizer}", "data.valid_fraction=0.1"]


@pytest.fixture(scope="module")
def sft_reference(tmp_path_factory, sft_data):
    run = tmp_path_factory.mktemp("sft-ref") / "run"
    launch(run, 1, [*sft_data, "train.eval_interval=2"])
    return run


def test_eval_loss_is_the_mean_over_completion_targets_only(sft_reference, sft_data):
    """Recomputed from the final weights: the step's eval loss is Σ CE over the tokens the loss
    mask marks / their count, not over all tokens and not a mean of micro-batch means."""
    cfg = load_config(None, [*TINY, *sft_data])
    model, _ = load_model(sft_reference)
    t = cfg.train
    _, valid, _ = build_datasets(cfg.data, t.seed, t.steps * t.global_batch_size,
                                 t.eval_batches * t.global_batch_size, cfg.model.vocab_size)
    batch = get_batch(valid, 0, t.global_batch_size, t.global_batch_size, 0, 1, 0)
    mask = get_batch(valid, 0, t.global_batch_size, t.global_batch_size, 0, 1, 0, loss_mask=True)
    assert 0 < mask[:, 1:].sum() < mask[:, 1:].numel(), "the batch must hold prompts and targets"
    with torch.no_grad():
        ce = F.cross_entropy(model(batch[:, :-1]).logits.flatten(0, 1), batch[:, 1:].flatten(),
                             reduction="none").view(batch.shape[0], -1)
    targets = mask[:, 1:]
    per_target = (ce * targets).sum() / targets.sum()
    logged = metrics(sft_reference)[-1]["eval_loss"]
    assert logged == pytest.approx(per_target.item(), rel=1e-5)
    mbs = t.micro_batch_size
    micro_means = torch.stack([(ce[i:i + mbs] * targets[i:i + mbs]).sum() / targets[i:i + mbs].sum()
                               for i in range(0, len(ce), mbs)]).mean()
    assert logged != pytest.approx(micro_means.item(), rel=1e-5), "the test cannot tell the two apart"
    assert logged != pytest.approx(ce.mean().item(), rel=1e-3)


def test_first_step_lm_loss_does_not_depend_on_the_micro_batch_split(tmp_path, sft_reference, sft_data):
    """One micro-batch of 8 instead of four of 2: the same targets, so the same step-1 LM loss
    (the micro-batches hold different numbers of targets; a mean of their means would differ).
    Later steps differ by design: the load-balancing loss is per micro-batch."""
    run = tmp_path / "run"
    launch(run, 1, [*sft_data, "train.eval_interval=2", "train.micro_batch_size=8", "train.steps=1"])
    assert metrics(run)[0]["lm_loss"] == pytest.approx(metrics(sft_reference)[0]["lm_loss"], rel=1e-6)


@pytest.mark.parametrize("nproc,layout", [
    (2, ["parallel.zero_stage=1"]),
    (2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    (2, ["parallel.pipeline=2"]),
    (2, ["parallel.expert=2"]),
], ids=["dp2-zero1", "tp2-sp", "pp2", "ep2"])
def test_fine_tuning_gives_the_same_run_in_every_layout(tmp_path, sft_reference, sft_data, nproc, layout):
    run = tmp_path / "run"
    launch(run, nproc, [*sft_data, "train.eval_interval=2", *layout])
    assert_same_run(run, sft_reference)
    for a, b in zip(metrics(run), metrics(sft_reference)):
        if "eval_loss" in b:
            assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-4), a["step"]


def test_chat_fine_tuning_with_document_masking_keeps_each_conversation_whole(tmp_path):
    """Multi-turn chat data (an EOS after every assistant turn) under model.attention_mask=document: the
    samples' document numbers follow the conversations (the dataset's documents), so an EOS inside a
    conversation ends nothing and its later turns see the earlier ones; PP2 (the schedule hands every stage
    the micro-batch's numbers, with the loss mask's labels) is the 1-rank run, which is not the causal one."""
    _, tokenizer = ensure_default_corpus(CORPUS_CACHE, vocab_size=512)
    texts = [doc["text"][:300] for doc in iter_stdlib_documents(max_bytes=200_000)]
    with open(tmp_path / "chat.jsonl", "w") as f:
        for i in range(0, len(texts) - 3, 3):  # a user question, two assistant turns between
            messages = [{"role": "user", "content": texts[i][:40]}, {"role": "assistant", "content": texts[i][40:80]},
                        {"role": "user", "content": texts[i + 1][:30]},
                        {"role": "assistant", "content": texts[i + 2][:60]}]
            f.write(json.dumps({"messages": messages}) + "\n")
    preprocess([tmp_path / "chat.jsonl"], tmp_path / "chat", tokenizer, messages_key="messages", progress=False)
    data = [f"data.paths=[{tmp_path / 'chat'}]", f"data.tokenizer={tokenizer}", "data.valid_fraction=0.1"]
    cfg = load_config(None, [*TINY, *data, "model.attention_mask=document"])
    train, _, tok = build_datasets(cfg.data, cfg.train.seed, 32, 8, cfg.model.vocab_size)  # the runs' samples
    inner = crossing = 0  # EOS tokens followed by a token of the same document; samples of two documents
    for i in range(32):
        tokens, numbers = train[i], train.documents(i)
        inner += int(((tokens[:-1] == tok.eos_id) & (numbers[1:] == numbers[:-1])).sum())
        crossing += int(numbers[-2] > 0)
    assert inner > 0 and crossing > 0
    runs = {name: tmp_path / name for name in ("one", "pp2", "causal")}
    launch(runs["one"], 1, [*data, "model.attention_mask=document"])
    launch(runs["pp2"], 2, [*data, "model.attention_mask=document", "parallel.pipeline=2"])
    launch(runs["causal"], 1, data)
    assert_same_run(runs["pp2"], runs["one"])
    # a sample's later conversation starts with its user turn, no target of the loss: the routers see it
    assert [r["lb_loss"] for r in metrics(runs["one"])] != [r["lb_loss"] for r in metrics(runs["causal"])]
