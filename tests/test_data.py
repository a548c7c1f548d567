"""The data pipeline: indexed files, packing, splits, blending, batching, tokenizers, tools."""

import functools
import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megamoe.config import DataConfig
from megamoe.data.corpus import iter_stdlib_documents, split_docstrings, write_jsonl
from megamoe.data.dataset import (BlendedDataset, GPTDataset, blend_indices, build_datasets,
                                  _loss_mask_for, get_batch, split_documents)
from megamoe.data.indexed import IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError
from megamoe.data import prepare
from megamoe.data.prepare import BadInputError, ensure_default_corpus, preprocess
from megamoe.data.tokenizer import HFTokenizer, load_tokenizer, train_sentencepiece

REPO = Path(__file__).resolve().parents[1]
UNICODE = "naïve café — 日本語のテキスト, emoji 🎉, tabs\tand\n    indented code"


def make_indexed(prefix, docs, dtype=np.uint16) -> IndexedDataset:
    with IndexedDatasetBuilder(prefix, dtype) as builder:
        for doc in docs:
            builder.add_document(doc)
        builder.finalize()
    return IndexedDataset(prefix)


def numbered_docs(sizes):
    """Documents whose tokens are their own global positions, so coverage is checkable."""
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return [np.arange(s, s + n) for s, n in zip(starts, sizes)]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """A JSONL slice of the stdlib corpus and a 1000-piece tokenizer trained on it."""
    root = tmp_path_factory.mktemp("corpus")
    jsonl = root / "corpus.jsonl"
    write_jsonl(iter_stdlib_documents(max_bytes=400_000), jsonl)
    return jsonl, train_sentencepiece([jsonl], root / "tok", vocab_size=1000)


# Corpus --------------------------------------------------------------------------------

def test_stdlib_corpus_has_both_domains_and_is_deterministic():
    docs = list(iter_stdlib_documents(max_bytes=200_000))
    assert {d["domain"] for d in docs} == {"code", "docs"}
    assert docs == list(iter_stdlib_documents(max_bytes=200_000))
    assert sum(len(d["text"].encode()) for d in docs[:-1]) < 200_000


def test_split_docstrings_keeps_code_shape():
    code, docs = split_docstrings('"""Module doc."""\nimport os\n\ndef f():\n    """Only doc."""\n\n'
                                  'class C:\n    """Doc."""\n    x = 1\n')
    assert docs == ["Module doc.", "Only doc.", "Doc."]
    assert '"""' not in code and "    ...\n" in code and "x = 1" in code
    compile(code, "<stripped>", "exec")


# Indexed dataset ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_indexed_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60000, size=n) for n in (5, 1, 0, 300, 17)]
    ds = make_indexed(tmp_path / "ds", docs, dtype)
    assert len(ds) == 5 and ds.dtype == np.dtype(dtype)
    assert ds.sizes.tolist() == [5, 1, 0, 300, 17]
    for doc, read in zip(docs, (ds[i] for i in range(len(ds)))):
        np.testing.assert_array_equal(read, doc)
    np.testing.assert_array_equal(ds.get(3, offset=10, length=7), docs[3][10:17])
    assert not list(tmp_path.glob("*.tmp*")), "temporary files left behind"


def test_indexed_rejects_out_of_range_ids(tmp_path):
    with pytest.raises(ValueError, match="int32"), IndexedDatasetBuilder(tmp_path / "ds") as b:
        b.add_document([70000])
    assert not list(tmp_path.iterdir()), "a failed build must leave nothing behind"


def test_indexed_errors_name_the_file(tmp_path):
    make_indexed(tmp_path / "ds", [np.arange(100), np.arange(50)])
    idx, bin_ = tmp_path / "ds.idx", tmp_path / "ds.bin"
    good_idx, good_bin = idx.read_bytes(), bin_.read_bytes()

    bin_.write_bytes(good_bin[:-10])
    with pytest.raises(IndexedDatasetError, match=r"ds\.bin.*truncated"):
        IndexedDataset(tmp_path / "ds")
    bin_.write_bytes(good_bin)

    idx.write_bytes(good_idx[:-3])
    with pytest.raises(IndexedDatasetError, match=r"ds\.idx.*truncated"):
        IndexedDataset(tmp_path / "ds")
    idx.write_bytes(b"garbage" + good_idx[7:])
    with pytest.raises(IndexedDatasetError, match=r"ds\.idx.*bad header"):
        IndexedDataset(tmp_path / "ds")
    corrupt = bytearray(good_idx)
    corrupt[34] ^= 0xFF  # first document's size
    idx.write_bytes(bytes(corrupt))
    with pytest.raises(IndexedDatasetError, match=r"ds\.idx.*corrupt"):
        IndexedDataset(tmp_path / "ds")

    idx.unlink()
    with pytest.raises(IndexedDatasetError, match=r"ds\.idx does not exist.*megamoe-preprocess"):
        IndexedDataset(tmp_path / "ds")


# Packing, splits, blending, batches -------------------------------------------------------

def test_packing_covers_every_token_once_per_epoch(tmp_path):
    sizes = [7, 1, 30, 12, 5, 40, 3]  # 98 tokens (EOS included, as preprocess stores them)
    ds = make_indexed(tmp_path / "ds", numbered_docs(sizes), np.int32)
    total, seq = sum(sizes), 7  # 14 samples per epoch exactly
    gpt = GPTDataset(ds, np.arange(len(sizes)), seq, 40, seed=1)
    assert gpt.epochs == 3
    samples = [gpt[i] for i in range(len(gpt))]
    assert all(s.shape == (seq + 1,) and s.dtype == np.int64 for s in samples)
    for epoch in range(2):  # complete epochs: every token is an input exactly once
        inputs = np.concatenate([s[:-1] for s in samples[epoch * 14:(epoch + 1) * 14]])
        assert sorted(inputs.tolist()) == list(range(total))
    assert [s[0] for s in samples[:14]] != sorted(s[0] for s in samples[:14]), "not shuffled"
    again = GPTDataset(ds, np.arange(len(sizes)), seq, 40, seed=1)
    assert all(np.array_equal(a, again[i]) for i, a in enumerate(samples))
    other_seed = GPTDataset(ds, np.arange(len(sizes)), seq, 40, seed=2)
    assert not all(np.array_equal(a, other_seed[i]) for i, a in enumerate(samples))


def test_packing_with_a_ragged_epoch_covers_every_token(tmp_path):
    sizes = [7, 1, 30, 12, 5, 40, 3]
    ds = make_indexed(tmp_path / "ds", numbered_docs(sizes), np.int32)
    gpt = GPTDataset(ds, np.arange(len(sizes)), 8, 13, seed=0)  # ceil(98 / 8) = 13 samples
    inputs = np.concatenate([gpt[i][:-1] for i in range(13)])
    counts = np.bincount(inputs, minlength=98)
    assert (counts >= 1).all() and counts.sum() - 98 < 8, "only the last sample runs over"


def test_document_numbers_follow_the_index_documents_not_eos_tokens(tmp_path):
    """`GPTDataset.documents` (model.attention_mask=document): each sample's tokens numbered by the document
    they come from, 0 for the first (or its tail), counting up at each document start, which the token values
    locate here (consecutive numbers across the documents), also where one document follows itself across an
    epoch's edge; the token values are not looked at (2, the tokenizers' EOS, lies inside the first document
    here, as a chat turn's end does). Blending and `get_batch(documents=True)` hand the same numbers on."""
    sizes = [7, 1, 30, 12, 5, 40, 3]
    ds = make_indexed(tmp_path / "ds", numbered_docs(sizes), np.int32)
    starts = set(np.cumsum([0] + sizes[:-1]).tolist())
    gpt = GPTDataset(ds, np.arange(len(sizes)), 7, 40, seed=1)
    crossed = 0
    for i in range(len(gpt)):
        tokens, numbers = gpt[i], gpt.documents(i)
        expected = np.cumsum([int(t) in starts and j > 0 for j, t in enumerate(tokens)])
        np.testing.assert_array_equal(numbers, expected)
        crossed += int(numbers[-1] > 0)
    assert crossed > 10  # most samples hold parts of two or more documents
    blend = BlendedDataset([gpt], [1.0], 40)
    batch = get_batch(blend, 1, 4, 2, 1, 2, 0, documents=True)
    np.testing.assert_array_equal(batch.numpy(), np.stack([gpt.documents(6), gpt.documents(7)]))


def test_samples_do_not_depend_on_run_length(tmp_path):
    ds = make_indexed(tmp_path / "ds", numbered_docs([13] * 20), np.int32)
    short = GPTDataset(ds, np.arange(20), 16, 10, seed=3)
    long = GPTDataset(ds, np.arange(20), 16, 100, seed=3)
    for i in range(10):
        np.testing.assert_array_equal(short[i], long[i])


def test_split_is_disjoint_complete_and_deterministic():
    train, valid = split_documents(1000, 0.05)
    assert len(valid) == 50 and len(np.intersect1d(train, valid)) == 0
    assert sorted(np.concatenate([train, valid]).tolist()) == list(range(1000))
    again = split_documents(1000, 0.05)
    assert np.array_equal(train, again[0]) and np.array_equal(valid, again[1])
    assert valid.max() - valid.min() > 500, "valid documents should span the corpus"
    with pytest.raises(ValueError, match="more documents"):
        split_documents(1, 0.5)


def test_split_datasets_only_read_their_own_documents(tmp_path):
    ds = make_indexed(tmp_path / "ds", [np.full(10, d) for d in range(40)])
    train_docs, valid_docs = split_documents(40, 0.25)
    seen = {which: set(np.concatenate([GPTDataset(ds, docs, 8, 60, seed=0)[i] for i in range(60)]))
            for which, docs in (("train", train_docs), ("valid", valid_docs))}
    assert seen["train"] == set(train_docs.tolist())
    assert seen["valid"] == set(valid_docs.tolist())


def test_blending_proportions_and_determinism():
    dataset_idx, sample_idx = blend_indices([0.5, 0.3, 0.2], 1000)
    counts = np.bincount(dataset_idx, minlength=3)
    assert np.abs(counts - [500, 300, 200]).max() <= 1
    for n in (10, 97, 500):  # every prefix is within one sample of its target share
        prefix_counts = np.bincount(dataset_idx[:n], minlength=3)
        assert np.abs(prefix_counts - np.array([.5, .3, .2]) * n).max() <= 1
    for j in range(3):  # each dataset is read in order, from its first sample
        assert sample_idx[dataset_idx == j].tolist() == list(range(counts[j]))
    assert np.array_equal(dataset_idx, blend_indices([5, 3, 2], 1000)[0])


def test_blended_dataset_draws_from_its_parts():
    parts = [[np.full(3, j * 100 + i) for i in range(40)] for j in range(2)]
    blended = BlendedDataset(parts, [3, 1], 40)
    firsts = [int(blended[i][0]) for i in range(40)]
    assert sum(f >= 100 for f in firsts) == 10
    assert [f for f in firsts if f < 100] == list(range(30))


def test_get_batch_dp2_acc1_equals_dp1_acc2():
    samples = [np.full(5, i) for i in range(64)]
    gbs, mbs, step = 8, 2, 3

    def ids(dp_size, acc):
        return [int(get_batch(samples, step, gbs, mbs, rank, dp_size, micro)[j, 0])
                for micro in range(acc) for rank in range(dp_size) for j in range(mbs)]

    expected = list(range(step * gbs, (step + 1) * gbs))
    assert ids(dp_size=2, acc=2) == ids(dp_size=1, acc=4) == ids(dp_size=4, acc=1) == expected
    batch = get_batch(samples, step, gbs, mbs, 1, 2, 1)
    assert batch.shape == (mbs, 5) and str(batch.dtype) == "torch.int64"
    with pytest.raises(IndexError, match="more samples"):
        get_batch(samples, 8, gbs, mbs, 0, 1, 0)


# Tokenizers ------------------------------------------------------------------------------

def test_sentencepiece_round_trips_any_text(small_corpus):
    _, model = small_corpus
    tok = load_tokenizer(model)
    assert tok.vocab_size == 1000 and (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    code = (REPO / "megamoe" / "data" / "indexed.py").read_text()
    for text in (UNICODE, code, "  leading and trailing spaces  ", "x\u0000y\r\n"):
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(code)) < len(code.encode()) / 2, "code should compress well"


def test_train_sentencepiece_too_small_corpus_is_clear(tmp_path):
    (tmp_path / "tiny.txt").write_text("hello world\n" * 10)
    with pytest.raises(ValueError, match="too small for vocab_size=1000"):
        train_sentencepiece([tmp_path / "tiny.txt"], tmp_path / "tok", 1000)


def test_hf_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([UNICODE, "def f(x):\n    return x + 1\n"] * 20, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(loaded, HFTokenizer)
    assert (loaded.pad_id, loaded.bos_id, loaded.eos_id) == (0, 1, 2)
    assert loaded.decode(loaded.encode(UNICODE)) == UNICODE
    report = preprocess([_jsonl(tmp_path / "in.jsonl", [UNICODE, "more"])], tmp_path / "out",
                        tmp_path / "tokenizer.json", progress=False)
    assert report.documents == 2 and IndexedDataset(tmp_path / "out")[0][-1] == 2


def test_load_tokenizer_errors_name_file_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.model does not exist.*megamoe-tokenizer"):
        load_tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.bin").write_bytes(b"\x00\x01 not a model")
    with pytest.raises(ValueError, match=r"junk\.bin is neither"):
        load_tokenizer(tmp_path / "junk.bin")
    (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match=r"bad\.json looks like JSON"):
        load_tokenizer(tmp_path / "bad.json")


# Preprocessing --------------------------------------------------------------------------

def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    return path


def _bad_jsonl(path):
    """Ten lines: good documents on lines 1, 3, 6, 9, 10; bad ones elsewhere."""
    lines = [json.dumps({"text": "first good document"}).encode(),
             b"{not json",
             json.dumps({"text": UNICODE}, ensure_ascii=False).encode(),
             json.dumps({"text": "   "}).encode(),
             b'{"text": "bad \xff\xfe bytes"}',
             json.dumps({"text": "third"}).encode(),
             json.dumps({"body": "wrong key"}).encode(),
             b'{"text": "lone \\ud800 surrogate"}',
             json.dumps({"text": "fourth"}).encode(),
             json.dumps({"text": "fifth"}).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_preprocess_skips_and_counts_bad_lines(tmp_path, small_corpus, caplog):
    _, model = small_corpus
    src = _bad_jsonl(tmp_path / "in.jsonl")
    report = preprocess([src], tmp_path / "out", model, workers=2, progress=False)
    assert report.documents == 5
    assert dict(report.skipped) == {"malformed JSON": 1, "empty document": 1, "not UTF-8": 2,
                                    "no string 'text' field": 1}
    assert report.examples["not UTF-8"] == [f"{src}:5", f"{src}:8"]
    assert f"{src}:2" in caplog.text, "the warning names file:line"
    tok, ds = load_tokenizer(model), IndexedDataset(tmp_path / "out")
    assert ds[1][-1] == tok.eos_id and tok.decode(ds[1][:-1]) == UNICODE
    assert [tok.decode(ds[i][:-1]) for i in (0, 2, 3, 4)] == [
        "first good document", "third", "fourth", "fifth"]


def test_preprocess_strict_names_file_and_line(tmp_path, small_corpus):
    _, model = small_corpus
    src = _bad_jsonl(tmp_path / "in.jsonl")
    with pytest.raises(BadInputError, match=rf"{src}:2: malformed JSON"):
        preprocess([src], tmp_path / "out", model, workers=2, strict=True, progress=False)
    assert not list(tmp_path.glob("out*")), "a failed run must leave no output"


def test_preprocess_text_file_bad_bytes_name_line(tmp_path, small_corpus):
    _, model = small_corpus
    (tmp_path / "a.txt").write_bytes(b"line one\nline two \xff\n")
    (tmp_path / "b.txt").write_text(UNICODE)
    report = preprocess([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "out", model,
                        progress=False)
    assert report.documents == 1 and report.examples["not UTF-8"] == [f"{tmp_path / 'a.txt'}:2"]


def test_preprocess_with_no_usable_documents_points_at_json_key(tmp_path, small_corpus):
    _, model = small_corpus
    src = tmp_path / "in.jsonl"
    src.write_text('{"content": "text under another key"}\n')
    with pytest.raises(ValueError, match="check --json-key"):
        preprocess([src], tmp_path / "out", model, progress=False)
    assert not list(tmp_path.glob("out*"))


def test_preprocess_cli_never_overwrites_without_flag(tmp_path, small_corpus):
    jsonl, model = small_corpus
    out = tmp_path / "out"

    def cli(*extra):
        return subprocess.run([sys.executable, "-m", "megamoe.cli.preprocess", "--input", str(jsonl), "--output-prefix",
                               str(out), "--tokenizer", str(model), "--no-progress", *extra],
                              cwd=REPO, capture_output=True, text=True)

    first = cli("--workers", "2")
    assert first.returncode == 0, first.stderr
    assert "documents" in first.stdout
    ds = IndexedDataset(out)
    documents = sum(1 for _ in open(jsonl))
    assert len(ds) == documents
    before = (tmp_path / "out.bin").read_bytes()

    again = cli()
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert (tmp_path / "out.bin").read_bytes() == before

    assert cli("--overwrite").returncode == 0
    assert (tmp_path / "out.bin").read_bytes() == before, "1 and 2 workers give the same bytes"


def test_train_tokenizer_cli(tmp_path, small_corpus):
    jsonl, _ = small_corpus

    def cli(vocab_size, prefix="tok"):
        return subprocess.run([sys.executable, "-m", "megamoe.cli.tokenizer", "--input", str(jsonl),
                               "--model-prefix", str(tmp_path / prefix), "--vocab-size", str(vocab_size)],
                              cwd=REPO, capture_output=True, text=True)

    result = cli(600)
    assert result.returncode == 0, result.stderr
    assert load_tokenizer(tmp_path / "tok.model").vocab_size == 600
    too_big = cli(32000, "tok2")  # more pieces than the text has: one error line saying what fits
    assert too_big.returncode == 2 and "Traceback" not in too_big.stderr
    assert too_big.stderr.startswith("megamoe-tokenizer: error: the training text is too small for vocab_size=32000")
    assert "lower vocab_size" in too_big.stderr


# Default corpus ----------------------------------------------------------------------------

def test_default_corpus_concurrent_builds_give_one_valid_result(tmp_path):
    build = functools.partial(ensure_default_corpus, vocab_size=1000, max_bytes=300_000)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.map(build, [tmp_path, tmp_path])
    assert results[0] == results[1]
    prefix, tokenizer_path = results[0]
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [
        prefix.parent.name], "one result, no temporary directories left"
    tok, ds = load_tokenizer(tokenizer_path), IndexedDataset(prefix)
    assert tok.vocab_size == 1000 and len(ds) >= 10
    assert all(ds[i][-1] == tok.eos_id for i in range(len(ds)))
    assert build(tmp_path) == results[0]  # cached


def test_build_datasets_default_corpus_and_blended_paths(tmp_path, monkeypatch):
    small = functools.partial(ensure_default_corpus, max_bytes=300_000)
    monkeypatch.setattr(prepare, "ensure_default_corpus", small)
    cfg = DataConfig(cache_dir=str(tmp_path), seq_length=64, valid_fraction=0.1)
    train, valid, tok = build_datasets(cfg, seed=0, num_train_samples=50, num_valid_samples=10,
                                       model_vocab_size=1000)
    assert len(train) == 50 and len(valid) == 10 and tok.vocab_size == 1000
    assert get_batch(train, 1, 4, 2, 0, 1, 1).shape == (2, 65)
    with pytest.raises(ValueError, match="unset data.tokenizer"):
        build_datasets(DataConfig(tokenizer="x.model"), seed=0, num_train_samples=5,
                       num_valid_samples=5)

    prefix, tokenizer_path = small(tmp_path, vocab_size=1000)
    cfg = DataConfig(paths=[str(prefix), str(prefix)], weights=[3.0, 1.0],
                     tokenizer=str(tokenizer_path), seq_length=32)
    train, _, _ = build_datasets(cfg, seed=0, num_train_samples=100, num_valid_samples=4)
    assert np.bincount(train.dataset_idx).tolist() == [75, 25]
    with pytest.raises(ValueError, match="more than model.vocab_size=800"):
        build_datasets(cfg, seed=0, num_train_samples=5, num_valid_samples=5, model_vocab_size=800)


# Fine-tuning data: prompt/completion with a loss mask ---------------------------------------

def test_prompt_completion_documents_mask_the_prompt(tmp_path, small_corpus):
    _, model = small_corpus
    tok = load_tokenizer(model)
    records = [{"prompt": "Q: what is 2 + 2?\nA:", "completion": " 4"},
               {"prompt": "", "completion": "def f():\n    return 1"},  # no prompt: all targets
               {"prompt": "only a prompt", "completion": ""},          # nothing to learn: skipped
               {"completion": "no prompt field"},                      # skipped
               {"prompt": UNICODE, "completion": "naïve → café"}]
    src = tmp_path / "sft.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    report = preprocess([src], tmp_path / "sft", model, json_key="completion", prompt_key="prompt",
                        workers=2, progress=False)
    assert report.documents == 3 and sum(report.skipped.values()) == 2
    assert report.examples["no string 'prompt' field"] == [f"{src}:4"]
    tokens, mask = IndexedDataset(tmp_path / "sft"), IndexedDataset(tmp_path / "sft.lossmask")
    assert mask.dtype == np.uint8 and np.array_equal(mask.sizes, tokens.sizes)
    kept = [records[0], records[1], records[4]]
    assert report.targets == sum(len(tok.encode(r["completion"])) + 1 for r in kept)
    for i, r in enumerate(kept):
        prompt = tok.encode(r["prompt"]) if r["prompt"] else []
        completion = tok.encode(r["completion"]) + [tok.eos_id]
        assert tokens[i].tolist() == prompt + completion
        assert mask[i].tolist() == [0] * len(prompt) + [1] * len(completion)


def test_loss_mask_follows_its_tokens_through_packing_splits_and_blending(tmp_path):
    """A mask that is a function of the token (odd ids are targets) must still be that
    function of every packed sample, whatever document boundaries the sample crosses."""
    sizes = [7, 1, 30, 12, 5, 40, 3]
    docs = numbered_docs(sizes)
    make_indexed(tmp_path / "ds", docs, np.int32)
    make_indexed(tmp_path / "ds.lossmask", [d % 2 for d in docs], np.uint8)
    make_indexed(tmp_path / "plain", docs, np.int32)
    ds, plain = IndexedDataset(tmp_path / "ds"), IndexedDataset(tmp_path / "plain")
    gpt = GPTDataset(ds, np.arange(len(sizes)), 5, 30, seed=3, loss_mask=_loss_mask_for(str(tmp_path / "ds"), ds))
    for i in range(len(gpt)):
        assert np.array_equal(gpt.loss_mask(i), gpt[i] % 2 == 1)
    unmasked = GPTDataset(plain, np.arange(len(sizes)), 5, 30, seed=3,
                          loss_mask=_loss_mask_for(str(tmp_path / "plain"), plain))
    blend = BlendedDataset([gpt, unmasked], [0.5, 0.5], 40)
    assert blend.has_loss_mask and not BlendedDataset([unmasked], [1.0], 10).has_loss_mask
    for i in range(len(blend)):
        expected = blend[i] % 2 == 1 if blend.dataset_idx[i] == 0 else np.ones(6, dtype=bool)
        assert np.array_equal(blend.loss_mask(i), expected)
    batch = get_batch(blend, 1, 8, 2, 1, 2, 1, loss_mask=True)
    assert batch.dtype == torch.bool and batch.shape == (2, 6)
    first = 1 * 8 + 1 * (2 * 2) + 1 * 2  # step 1, micro-step 1 of DP rank 1 (get_batch's order)
    assert torch.equal(batch, torch.from_numpy(np.stack([blend.loss_mask(first + j) for j in range(2)])))


def test_loss_mask_of_other_documents_and_prompt_key_on_text_are_refused(tmp_path, small_corpus):
    _, model = small_corpus
    make_indexed(tmp_path / "ds", numbered_docs([4, 5, 6]), np.int32)
    make_indexed(tmp_path / "ds.lossmask", [np.ones(4), np.ones(5)], np.uint8)  # a document short
    with pytest.raises(ValueError, match=r"ds.lossmask.idx does not describe the documents.*--overwrite"):
        _loss_mask_for(str(tmp_path / "ds"), IndexedDataset(tmp_path / "ds"))
    (tmp_path / "a.txt").write_text("plain text")
    with pytest.raises(ValueError, match="must be JSONL"):
        preprocess([tmp_path / "a.txt"], tmp_path / "out", model, json_key="completion",
                   prompt_key="prompt", progress=False)
    assert not list(tmp_path.glob("out*"))


def test_chat_conversations_train_on_assistant_turns_only(tmp_path, small_corpus):
    _, model = small_corpus
    tok = load_tokenizer(model)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"},
            {"role": "assistant", "content": "6, " + UNICODE}]
    lines = [{"messages": chat},
             {"messages": [{"role": "user", "content": "hi"}]},               # nothing to learn
             {"messages": [{"role": "robot", "content": "beep"}]},            # unknown role
             {"messages": "not a list"}]
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in lines))
    report = preprocess([src], tmp_path / "chat", model, messages_key="messages", progress=False)
    assert report.documents == 1
    assert dict(report.skipped) == {"no assistant turn (nothing to learn)": 1, "no list 'messages' field": 1,
                                    'a message that is not {"role": system|user|assistant, "content": str}': 1}
    eos = [tok.eos_id]
    expected = [(tok.encode("<|system|>\nBe brief.\n"), 0), (tok.encode("<|user|>\n2 + 2?\n"), 0),
                (tok.encode("<|assistant|>\n"), 0), (tok.encode("4") + eos, 1),
                (tok.encode("<|user|>\nAnd 3 + 3?\n"), 0), (tok.encode("<|assistant|>\n"), 0),
                (tok.encode("6, " + UNICODE) + eos, 1)]
    tokens, mask = IndexedDataset(tmp_path / "chat"), IndexedDataset(tmp_path / "chat.lossmask")
    assert tokens[0].tolist() == [t for ids, _ in expected for t in ids]
    assert mask[0].tolist() == [m for ids, m in expected for _ in ids]
    assert tok.decode(tokens[0][mask[0] == 1][:-1].tolist()).startswith("4")
    with pytest.raises(ValueError, match="give one of them"):
        preprocess([src], tmp_path / "both", model, messages_key="messages", prompt_key="prompt",
                   progress=False)
