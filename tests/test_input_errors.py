"""Bad input gets one `megamoe: error:` line naming the problem and the fix, before setup."""

import json
import shutil

import numpy as np
import pytest

from megamoe.checkpoint.files import CheckpointError, read_meta
from megamoe.checkpoint.hf_dirs import _hf_files
from megamoe.config import ConfigError, DataConfig, load_config
from megamoe.data.dataset import check_data, data_sources
from megamoe.data.indexed import IndexedDatasetBuilder
from megamoe.train.rundir import RunLock, prepare_run_dir
from runs import CORPUS_CACHE, TINY, launch


@pytest.mark.parametrize("override,key", [
    ("optim.lr=inf", "optim.lr"), ("optim.lr=.nan", "optim.lr"), ("model.rms_norm_eps=-1", "model.rms_norm_eps"),
    ("model.init_std=-1", "model.init_std"), ("optim.grad_clip=-1", "optim.grad_clip"),
    ("train.eval_batches=0", "train.eval_batches"), ("optim.beta2=2", "optim.beta2"),
    ("optim.beta1=-0.1", "optim.beta1"), ("model.head_dim=-4", "model.head_dim"),
    ("moe.num_shared_experts=-1", "moe.num_shared_experts"), ("optim.eps=0", "optim.eps"),
    ("model.clip_qkv=-1", "model.clip_qkv"), ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("data.tokenizer=t.model", "data.tokenizer"),
])
def test_values_out_of_range_are_refused_by_key(override, key):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        load_config(None, [*TINY, override]).validate()


def test_grad_clip_zero_still_means_no_clipping():
    load_config(None, [*TINY, "optim.grad_clip=0"]).validate()


@pytest.mark.parametrize("content,fix", [
    (b"", "is empty"), (b"model: 5\n", "model: must be a mapping"),
    (b"train:\n  steps: 3 # \xe9t\xe9\n", "not UTF-8"), (b"- a\n- b\n", "mapping of sections"),
])
def test_malformed_config_files(tmp_path, content, fix):
    f = tmp_path / "c.yaml"
    f.write_bytes(content)
    with pytest.raises(ConfigError, match=fix):
        load_config(f)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The tiny runs' corpus (512-token tokenizer), copied where a test may damage it."""
    (prefix,), tokenizer = data_sources(DataConfig(cache_dir=str(CORPUS_CACHE)), 512)
    d = tmp_path_factory.mktemp("corpus")
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{prefix}{suffix}", d / f"corpus{suffix}")
    shutil.copy(tokenizer, d / "tok.model")
    return d


def _data(corpus, tmp_path, name="corpus"):
    return DataConfig(paths=[str(corpus / name)], tokenizer=str(corpus / "tok.model"), cache_dir=str(tmp_path))


def test_good_data_passes_and_its_largest_token_id_is_remembered(corpus, tmp_path):
    check_data(_data(corpus, tmp_path), 512)
    (cached,) = (tmp_path / "max-token-id").iterdir()
    assert 256 < int(cached.read_text()) < 512


@pytest.mark.parametrize("damage,fix", [
    ("no_bin", "corpus.bin does not exist"), ("no_tokenizer", "data.tokenizer: tokenizer file"),
    ("truncated_bin", "truncated or mismatched"), ("junk_idx", "bad header"),
])
def test_damaged_data_is_named(corpus, tmp_path, damage, fix):
    d = tmp_path / "d"
    shutil.copytree(corpus, d)
    if damage == "no_bin":
        (d / "corpus.bin").unlink()
    elif damage == "no_tokenizer":
        (d / "tok.model").unlink()
    elif damage == "truncated_bin":
        (d / "corpus.bin").write_bytes((d / "corpus.bin").read_bytes()[:-10])
    else:
        (d / "corpus.idx").write_bytes(b"not an index at all")
    with pytest.raises(ConfigError, match=fix):
        check_data(_data(d, tmp_path), 512)


def test_tokenizer_larger_than_the_model_is_refused(corpus, tmp_path):
    with pytest.raises(ConfigError, match="model.vocab_size: .* has 512 tokens, more than model.vocab_size=256"):
        check_data(_data(corpus, tmp_path), 256)


def _too_large_ids(corpus):
    """Data built with a larger tokenizer than the one the run names: ids up to 700."""
    with IndexedDatasetBuilder(corpus / "wide", np.uint16) as b:
        for i in range(64):
            b.add_document((np.arange(40) + 11 * i) % 700)
        b.finalize()
    return corpus / "wide"


def test_token_ids_beyond_the_vocab_fail_before_any_process_group_under_tp2(corpus, tmp_path):
    _too_large_ids(corpus)
    proc = launch(tmp_path / "run", 2, ["parallel.tensor=2", f"data.paths=[{corpus / 'wide'}]",
                                        f"data.tokenizer={corpus / 'tok.model'}"], check=False)
    assert proc.returncode != 0
    assert "megamoe: error: data.paths:" in proc.stderr, proc.stderr[-3000:]  # (torchrun may stop the
    assert "token id 699" in proc.stderr and "megamoe/" not in proc.stderr    # other rank first)
    assert not (tmp_path / "run").exists()  # refused before the run directory was touched


def test_unwritable_or_file_run_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    for run_dir, fix in [(tmp_path / "file", "is a file"), ("/sys/megamoe-run", "cannot write")]:
        cfg = load_config(None, [*TINY, f"run.dir={run_dir}"])
        with pytest.raises(ConfigError, match=f"run.dir: .*{fix}"):
            prepare_run_dir(cfg, RunLock(run_dir))


def test_meta_json_without_files_is_named(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"format": 2, "step": 1}))
    with pytest.raises(CheckpointError, match="has no 'files'"):
        read_meta(tmp_path)


def test_from_hf_reads_nothing_outside_its_folder(tmp_path):
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    src = tmp_path / "hf"
    src.mkdir()
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "../secret.safetensors"}}))
    with pytest.raises(CheckpointError, match="not a file name inside that folder"):
        _hf_files(src)


def test_a_misspelled_grouped_gemm_switch_is_refused_before_setup(monkeypatch, capsys, tmp_path):
    from megamoe.train.__main__ import main
    monkeypatch.setenv("MEGAMOE_GROUPED_GEMM", "Torch")
    assert main(["--config", "tiny-cpu", f"run.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("megamoe: error: MEGAMOE_GROUPED_GEMM='Torch'") and "torch" in err[0]
    assert not (tmp_path / "run").exists()
