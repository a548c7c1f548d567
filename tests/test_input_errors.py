"""Bad input gets one `megamoe: error:` line naming the problem and the fix, before setup."""

import json
import os
import shutil
import socket

import numpy as np
import pytest
import torch

from megamoe.checkpoint.canonical import load_canonical, write_run
from megamoe.checkpoint.files import CheckpointError, read_meta
from megamoe.checkpoint.hf import hf_config_dict, to_hf_per_expert
from megamoe.checkpoint.hf_dirs import _hf_files
from megamoe.config import ConfigError, DataConfig, from_dict, load_config
from megamoe.data.dataset import check_data, data_sources
from megamoe.data.tokenizer import load_tokenizer
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
    """optim.grad_clip=0 is valid and the optimizer it makes (max_norm 0) steps as torch's AdamW with no
    clipping, over gradients whose norms (12-110) any clipping would change."""
    from types import SimpleNamespace

    from megamoe.train.optimizer import AdamW
    cfg = load_config(None, [*TINY, "optim.grad_clip=0"]).validate()
    g = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in [(7, 5), (13,), (3, 4, 6)]]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    hyper = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    opt = AdamW([{"params": ours, "weight_decay": 0.0}], SimpleNamespace(tp=1, ep=1, pp=1),
                max_norm=cfg.optim.grad_clip, **hyper)
    torch_opt = torch.optim.AdamW(ref, weight_decay=0.0, foreach=False, **hyper)
    for step, scale in enumerate([1.0, 10.0, 0.5], 1):
        for p, q in zip(ours, ref):
            grad = torch.randn(p.shape, generator=g) * scale
            p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        torch_opt.step()
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=f"step {step}")


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


def test_meta_json_without_its_layout_or_config_is_named(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"format": 2, "step": 1, "files": {}, "world_size": 1}))
    with pytest.raises(CheckpointError, match="meta.json lacks layout, config: it is damaged"):
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


# Command lines: one `<tool>: error:` line, exit 2, nothing a user had replaced ------------------

def _error_line(capsys, tool):
    """The one line a refused command printed on stderr."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{tool}: error: "), err
    return err[0]


def _tiny_run(path, *overrides):
    """A TINY run directory at step 0 with fresh weights, written in a second."""
    from megamoe.model.olmoe import init_weights
    cfg = load_config(None, [*TINY, *overrides])
    model = cfg.model.build(cfg.moe)
    init_weights(model, cfg.model.init_std, cfg.train.seed)  # not build's uninitialised memory
    write_run(path, cfg, model.state_dict().items())
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return _tiny_run(tmp_path_factory.mktemp("tiny") / "run")


@pytest.fixture(scope="module")
def hf_dir(tiny_run, tmp_path_factory):
    """tiny_run as a transformers OLMoE directory (config.json + model.safetensors)."""
    from safetensors.torch import save_file
    out = tmp_path_factory.mktemp("hf")
    tensors, meta = load_canonical(tiny_run)
    cfg = from_dict(meta["config"])
    (out / "config.json").write_text(json.dumps({"model_type": "olmoe", **hf_config_dict(cfg)}))
    save_file({k: v.contiguous() for name, t in tensors.items() for k, v in to_hf_per_expert(name, t).items()},
              out / "model.safetensors")
    return out


def _text(path, lines=2000):
    path.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i % 7}"}) + "\n"
                            for i in range(lines)))
    return path


def test_tokenizer_never_replaces_a_model_without_overwrite(tmp_path, capsys):
    from megamoe.cli.tokenizer import main
    jsonl = _text(tmp_path / "c.jsonl")
    for suffix in (".model", ".vocab"):
        (tmp_path / f"tok{suffix}").write_text("mine")
    args = ["--input", str(jsonl), "--model-prefix", str(tmp_path / "tok"), "--vocab-size", "300"]
    assert main(args) == 2
    assert "tok.model/.vocab already exist" in _error_line(capsys, "megamoe-tokenizer")
    assert {p.read_text() for p in tmp_path.glob("tok.*")} == {"mine"}
    assert main([*args, "--overwrite"]) == 0
    assert load_tokenizer(tmp_path / "tok.model").vocab_size == 300


def test_tokenizer_names_a_json_key_no_line_has(tmp_path, capsys):
    from megamoe.cli.tokenizer import main
    jsonl = _text(tmp_path / "c.jsonl", 10)
    assert main(["--input", str(jsonl), "--model-prefix", str(tmp_path / "tok"), "--vocab-size", "300",
                 "--json-key", "body"]) == 2
    assert "--json-key 'body'" in _error_line(capsys, "megamoe-tokenizer")
    assert not list(tmp_path.glob("tok.*"))


@pytest.mark.parametrize("command", ["upcycle", "from-hf"])
def test_convert_takes_overrides_after_the_flags(tiny_run, hf_dir, tmp_path, command):
    from megamoe.cli.convert import main
    if command == "upcycle":
        src = _tiny_run(tmp_path / "dense", "moe.num_experts=0")
        flags = ["--num-experts", "8", "--top-k", "2", "moe.norm_topk_prob=true"]
    else:
        src, flags = hf_dir, ["--no-progress", "train.steps=5"]
    assert main([command, str(src), str(tmp_path / "out"), "moe.z_loss_weight=0", *flags, "train.seed=7"]) == 0
    cfg = load_config(tmp_path / "out" / "config.yaml")
    assert (cfg.moe.z_loss_weight, cfg.train.seed) == (0, 7)
    assert cfg.moe.norm_topk_prob if command == "upcycle" else cfg.train.steps == 5


def test_convert_still_refuses_unknown_arguments(tiny_run, tmp_path, capsys):
    from megamoe.cli.convert import main
    with pytest.raises(SystemExit) as e:
        main(["to-hf", str(tiny_run), str(tmp_path / "hf"), "train.steps=5"])  # to-hf takes no overrides
    assert e.value.code == 2 and "unrecognized arguments: train.steps=5" in capsys.readouterr().err


def test_convert_overwrite_refuses_a_run_dir_a_job_holds(hf_dir, tmp_path, capsys):
    from megamoe.cli.convert import main
    target = _tiny_run(tmp_path / "lk2", "train.seed=3")
    lock = RunLock(target).acquire()  # a training job's
    try:
        assert main(["from-hf", str(hf_dir), str(target), "--overwrite", "--no-progress"]) == 2
    finally:
        lock.release()
    line = _error_line(capsys, "megamoe-convert")
    assert "is in use by another job" in line and f"pid {os.getpid()}" in line
    assert load_config(target / "config.yaml").train.seed == 3  # untouched
    (target / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 1, "start": "then"}))
    assert main(["from-hf", str(hf_dir), str(target), "--overwrite", "--no-progress"]) == 0  # stale: no holder
    assert load_config(target / "config.yaml").train.seed != 3 and not (target / ".lock").exists()


@pytest.mark.parametrize("override", ["model.d_model=64", "moe.top_k=1"])
def test_from_hf_refuses_overrides_of_the_model_config_json_sets(hf_dir, tmp_path, capsys, override):
    from megamoe.cli.convert import main
    assert main(["from-hf", str(hf_dir), str(tmp_path / "out"), override]) == 2
    line = _error_line(capsys, "megamoe-convert")
    assert line.startswith(f"megamoe-convert: error: {override.partition('=')[0]}: ") and "config.json" in line
    assert not (tmp_path / "out").exists()


def _tree(path):
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


@pytest.mark.parametrize("command,out,fix", [
    ("to-hf SRC SRC", "SRC", "is the source SRC; write the output elsewhere"),
    ("to-hf SRC SRC/checkpoints", "SRC/checkpoints", "is a folder holding the source SRC/checkpoints/step_00000000"),
    ("reshard SRC SRC --world-size 1 parallel.tensor=1", "SRC", "is the source SRC;"),
    ("upcycle SRC/checkpoints/step_00000000 SRC --num-experts 8 --top-k 2", "SRC", "a folder holding the source"),
    ("from-hf HF HF", "HF", "is the source HF;"),
])
def test_overwrite_never_replaces_the_source_or_a_folder_holding_it(tmp_path, hf_dir, capsys, command, out, fix):
    """--overwrite replaces the output whole: given the source (or a folder around it) it would delete the
    run or the transformers model it reads; refused, nothing touched."""
    import shutil as sh
    from megamoe.cli.convert import main
    src, hf = _tiny_run(tmp_path / "run", *(["moe.num_experts=0"] if command.startswith("upcycle") else [])), \
        tmp_path / "hf"
    sh.copytree(hf_dir, hf)
    before = _tree(tmp_path)
    words = [w.replace("SRC", str(src)).replace("HF", str(hf)) for w in command.split()]
    assert main([*words, "--overwrite", "--no-progress"]) == 2
    line = _error_line(capsys, "megamoe-convert")
    assert f"error: {out.replace('SRC', str(src)).replace('HF', str(hf))} " in line
    assert fix.replace("SRC", str(src)).replace("HF", str(hf)) in line
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("flags,fix", [
    (["reshard", "--world-size", "0", "parallel.tensor=1"], "--world-size 0: give the number of ranks"),
    (["to-hf", "--shard-size-gb", "inf"], "--shard-size-gb inf: give a positive size"),
    (["upcycle", "--num-experts", "0", "--top-k", "2"], "--num-experts 0 --top-k 2: give 1 <= top-k <= num-experts"),
])
def test_convert_names_a_bad_flag_before_reading_anything(tiny_run, tmp_path, capsys, flags, fix):
    from megamoe.cli.convert import main
    assert main([flags[0], str(tiny_run), str(tmp_path / "out"), *flags[1:]]) == 2
    assert fix in _error_line(capsys, "megamoe-convert") and not (tmp_path / "out").exists()


@pytest.mark.parametrize("size", ["0", "-1"])
def test_to_hf_refuses_a_shard_size_that_is_not_positive(tiny_run, tmp_path, capsys, size):
    from megamoe.cli.convert import main
    assert main(["to-hf", str(tiny_run), str(tmp_path / "hf"), "--shard-size-gb", size]) == 2
    assert "--shard-size-gb" in _error_line(capsys, "megamoe-convert")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("flags,fix", [
    (["--top-k", "0"], "--top-k 0"), (["--max-new-tokens", "-5"], "--max-new-tokens -5"),
    (["--temperature", "-1"], "--temperature -1"), (["--prompt", ""], "--prompt is empty"),
])
def test_generate_refuses_values_it_cannot_sample_with(tiny_run, capsys, flags, fix):
    from megamoe.cli.generate import main
    assert main([str(tiny_run), "--prompt", "def ", *flags]) == 2
    assert fix in _error_line(capsys, "megamoe-generate")
    assert capsys.readouterr().out == ""


def test_eval_on_cuda_without_a_gpu_says_so(tiny_run, capsys, monkeypatch):
    import torch
    from megamoe.eval.cli import main
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        main([str(tiny_run), "--tasks", "next_line", "--device", "cuda"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("megamoe-eval: error: --device cuda: no GPU is visible")


@pytest.mark.parametrize("flag", ["--json", "--plots"])
def test_routing_never_replaces_its_outputs_without_overwrite(tiny_run, tmp_path, capsys, flag):
    from megamoe.cli.routing import main
    out = tmp_path / "out"
    mine = out / "domain_specialisation.json" if flag == "--plots" else out
    mine.parent.mkdir(exist_ok=True)
    mine.write_text("mine")
    args = [str(tiny_run), "--tokens", "64", "--no-progress", flag, str(out)]
    assert main(args) == 2
    line = _error_line(capsys, "megamoe-routing")
    assert f"{flag} {out}" in line and "--overwrite" in line
    assert mine.read_text() == "mine"
    assert main([*args, "--overwrite"]) == 0 and mine.read_text() != "mine"


def test_preprocess_refuses_zero_workers_and_exits_2_naming_overwrite(corpus, tmp_path, capsys):
    from megamoe.cli.preprocess import main
    args = ["--input", str(_text(tmp_path / "c.jsonl", 20)), "--output-prefix", str(tmp_path / "out"),
            "--tokenizer", str(corpus / "tok.model"), "--no-progress"]
    assert main([*args, "--workers", "0"]) == 2
    assert "--workers" in _error_line(capsys, "megamoe-preprocess") and not (tmp_path / "out.bin").exists()
    assert main(args) == 0
    before = (tmp_path / "out.bin").read_bytes()
    capsys.readouterr()
    assert main(args) == 2
    line = _error_line(capsys, "megamoe-preprocess")
    assert line.endswith("pass --overwrite to replace them") and "overwrite=True" not in line
    assert (tmp_path / "out.bin").read_bytes() == before


def test_plan_refuses_a_world_size_below_1(capsys):
    from megamoe.cli.plan import main
    assert main(["--config", "tiny-cpu", "--world-size", "0"]) == 2
    assert "--world-size 0" in _error_line(capsys, "megamoe-plan")


def test_routing_draws_no_progress_bars_into_a_log(tiny_run, capsys):
    """Like megamoe-convert, megamoe-routing draws its bars only on a terminal: a redirected stderr
    (a batch job's log) gets no carriage-return lines."""
    from megamoe.cli.routing import main
    assert main([str(tiny_run), "--tokens", "64"]) == 0
    assert "batch" not in capsys.readouterr().err


def test_eval_refuses_an_output_whose_folder_is_missing_before_it_scores(tiny_run, tmp_path, capsys):
    from megamoe.eval.cli import main
    with pytest.raises(SystemExit) as e:
        main([str(tiny_run), "--tasks", "next_line", "--output", str(tmp_path / "nodir" / "x.json")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert f"--output {tmp_path / 'nodir' / 'x.json'}: its folder {tmp_path / 'nodir'} does not exist" in err


@pytest.mark.parametrize("flags,fix", [
    (["--json", "NODIR/r.json"], "its folder NODIR does not exist"),
    (["--plots", "AFILE"], "--plots AFILE is a file"),
    (["--tokens", "-3"], "--tokens -3: give the number of tokens per domain"),
    (["--tokens", "0"], "--tokens 0: give the number of tokens per domain"),
    (["--jsonl", "NODIR/x.jsonl"], "--jsonl NODIR/x.jsonl does not exist; give a JSONL file of"),
    (["--jsonl", "RECORDS", "--domain-field", "dom"], "RECORDS:1: the record has no 'dom' (--domain-field) field; "
                                                       "name the fields the records hold (it has 'text', 'source')"),
])
def test_routing_refuses_outputs_it_could_not_write_before_it_runs(tiny_run, tmp_path, capsys, flags, fix):
    from megamoe.cli.routing import main
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "records.jsonl").write_text('{"text": "def f(): pass", "source": "code"}\n')
    names = {"NODIR": str(tmp_path / "nodir"), "AFILE": str(tmp_path / "afile"),
             "RECORDS": str(tmp_path / "records.jsonl")}
    flags = [names.get(f.split("/")[0], f.split("/")[0]) + f[len(f.split("/")[0]):] for f in flags]
    assert main([str(tiny_run), "--no-progress", *flags]) == 2
    line = _error_line(capsys, "megamoe-routing")
    for key, value in names.items():
        fix = fix.replace(key, value)
    assert fix in line and (tmp_path / "afile").read_text() == "mine"


def test_tools_name_a_run_tokenizer_that_moved(corpus, tmp_path, capsys):
    """A run trained on a tokenizer file that is gone since: generate, eval and routing say so in one line;
    to-hf exports the weights and warns that the export has no tokenizer."""
    from megamoe.cli.convert import main as convert
    from megamoe.cli.generate import main as generate
    from megamoe.cli.routing import main as routing
    from megamoe.eval.cli import main as evaluate
    tok = tmp_path / "moved.model"
    shutil.copy(corpus / "tok.model", tok)
    run = _tiny_run(tmp_path / "run", f"data.paths=[{corpus / 'corpus'}]", f"data.tokenizer={tok}")
    tok.unlink()
    for tool, main, args in [("megamoe-generate", generate, ["--prompt", "def "]),
                             ("megamoe-routing", routing, ["--tokens", "64"])]:
        assert main([str(run), *args]) == 2
        assert f"the run's tokenizer (data.tokenizer={tok}) cannot be opened" in _error_line(capsys, tool)
    assert evaluate([str(run), "--tasks", "next_line"]) == 2
    assert f"data.tokenizer={tok}" in _error_line(capsys, "megamoe")
    assert convert(["to-hf", str(run), str(tmp_path / "hf"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "megamoe: warning: the run's tokenizer cannot be opened" in err and "no tokenizer files" in err
    assert (tmp_path / "hf" / "config.json").is_file() and not list((tmp_path / "hf").glob("tokenizer*"))


def test_converted_runs_record_where_they_are(hf_dir, tiny_run, tmp_path, monkeypatch):
    """from-hf and reshard write config.yaml with the run's absolute run.dir: launched with --config from
    another directory, it continues that run rather than starting a new one there."""
    from megamoe.cli.convert import main
    monkeypatch.chdir(tmp_path)
    assert main(["from-hf", str(hf_dir), "imported", "--no-progress"]) == 0
    assert main(["reshard", str(tiny_run), "resharded", "--world-size", "2", "parallel.expert=2",
                 "--no-progress"]) == 0
    for name in ("imported", "resharded"):
        assert load_config(tmp_path / name / "config.yaml").run.dir == str(tmp_path / name)
    # a run started from another's weights is converted with its own checkpoint: the new run does not inherit
    # train.init_from (which would check the old source, or its shapes, at every launch)
    src = _tiny_run(tmp_path / "started", f"train.init_from={tiny_run}")
    assert load_config(src / "config.yaml").train.init_from is None


@pytest.mark.parametrize("damage,fix", [
    ("{bad", "config.json is not valid JSON"),
    ("[1, 2]", "config.json is not a JSON object of settings"),
    ("drop hidden_size", "config.json lacks 'hidden_size', which an OLMoE config has"),
    ("vocab_size 4096 as text", "model.vocab_size: expected int, got '4096'"),
    ("index {oops", "model.safetensors.index.json is not a JSON object with a weight_map"),
])
def test_from_hf_names_a_damaged_transformers_folder(hf_dir, tmp_path, capsys, damage, fix):
    from megamoe.cli.convert import main
    src = tmp_path / "hf"
    shutil.copytree(hf_dir, src)
    config = json.loads((src / "config.json").read_text())
    if damage.startswith("index"):
        (src / "model.safetensors.index.json").write_text("{oops")
    elif damage.startswith("drop"):
        del config["hidden_size"]
        (src / "config.json").write_text(json.dumps(config))
    elif damage.startswith("vocab"):
        (src / "config.json").write_text(json.dumps({**config, "vocab_size": "4096"}))
    else:
        (src / "config.json").write_text(damage)
    assert main(["from-hf", str(src), str(tmp_path / "out"), "--no-progress"]) == 2
    assert fix in _error_line(capsys, "megamoe-convert") and not (tmp_path / "out").exists()


def test_to_hf_names_tensors_its_meta_json_does_not_account_for(tmp_path, capsys):
    """A meta.json whose config describes another model than the tensors (4 layers of weights, the layer
    count dropped): refused, not exported as a 16-layer config.json over 2 layers' weights."""
    from megamoe.cli.convert import main
    run = _tiny_run(tmp_path / "run")
    step = run / "checkpoints" / "step_00000000"
    meta = json.loads((step / "meta.json").read_text())
    del meta["config"]["model"]["n_layers"]  # the default, 16, then
    (step / "meta.json").write_text(json.dumps(meta))
    assert main(["to-hf", str(run), str(tmp_path / "hf"), "--no-progress"]) == 2
    line = _error_line(capsys, "megamoe-convert")
    assert "its tensors do not match the model its meta.json describes (missing ['layers.2." in line
    assert not (tmp_path / "hf").exists()


def test_a_damaged_config_yaml_beside_checkpoints_is_kept_aside_and_the_run_resumes(tmp_path):
    run = tmp_path / "run"
    launch(run, 1, ["train.steps=2", "train.save_interval=1"])
    (run / "config.yaml").write_text("model: [unclosed\n")
    out = launch(run, 1, ["train.steps=3", "train.save_interval=1"]).stdout
    assert "resuming at step 2" in out
    kept = list(run.glob("config.*.yaml"))
    assert len(kept) == 1 and kept[0].read_text() == "model: [unclosed\n"


def test_plan_refuses_a_gpu_memory_that_is_not_a_size(capsys):
    from megamoe.cli.plan import main
    for value in ("0", "-1", "nan"):
        assert main(["--config", "tiny-cpu", "--world-size", "1", "--gpu-gib", value]) == 2
        assert f"--gpu-gib {float(value)}: give one GPU's memory in GiB" in _error_line(capsys, "megamoe-plan")


def test_preprocess_and_tokenizer_say_an_input_is_a_folder(tmp_path, capsys):
    from megamoe.cli.preprocess import main as preprocess
    from megamoe.cli.tokenizer import main as tokenizer
    assert tokenizer(["--input", str(tmp_path), "--model-prefix", str(tmp_path / "t"), "--vocab-size", "300"]) == 2
    assert f"input file {tmp_path} is a folder; give the text or JSONL files in it" in _error_line(
        capsys, "megamoe-tokenizer")
    assert preprocess(["--input", str(tmp_path), "--output-prefix", str(tmp_path / "o"), "--tokenizer",
                       str(tmp_path)]) == 2
    assert f"input file {tmp_path} is a folder" in _error_line(capsys, "megamoe-preprocess")


def test_overwrite_replaces_a_file_at_the_output_path_leaving_nothing_behind(tiny_run, tmp_path):
    from megamoe.cli.convert import main
    (tmp_path / "out").write_text("a file")
    assert main(["to-hf", str(tiny_run), str(tmp_path / "out"), "--overwrite", "--no-progress"]) == 0
    assert (tmp_path / "out" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .out.old-* left
