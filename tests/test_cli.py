"""Tests of the ``longrope-triton`` command line: --help, error paths (one line, exit status 2,
no traceback) and small end-to-end runs on a tiny random Llama saved as a model directory."""

import json
import subprocess
import sys

import pytest
import torch

from longrope_triton.cli import main

SUBCOMMANDS = ("demo", "search", "eval", "passkey", "finetune", "export", "serve")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer, hidden-64 Llama (trained context 32) with a character-level tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    path = tmp_path_factory.mktemp("tiny-llama")
    vocab = {"<unk>": 0, **{chr(i): i for i in range(32, 127)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<unk>").save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, rope_theta=10000.0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "story.txt"
    path.write_text(" ".join(f"Sentence {i} of a long and winding story." for i in range(40)))
    return path


def run_main(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    # progress bars (model loading) may precede it: the error itself is one line, the last
    last = err.strip().splitlines()[-1]
    assert last.startswith("longrope-triton ") and "error:" in last and "Traceback" not in err, err
    for f in fragments:
        assert f in last, last


# ---------------------------------------------------------------------------- help
def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "longrope_triton.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for sub in SUBCOMMANDS:
        assert sub in out.stdout
    assert "longrope-triton demo" in out.stdout  # an example a new user can copy


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_subcommand_help(sub, capsys):
    with pytest.raises(SystemExit) as exc:
        main([sub, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: longrope-triton " + sub)


def test_missing_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["search"])
    assert exc.value.code == 2
    assert "--target" in capsys.readouterr().err


def test_serve_without_serving_packages(monkeypatch, capsys):
    """The serve command names the packages it lacks (and the extra that installs them) in one line."""
    import longrope_triton.hf.serve as serve
    monkeypatch.setattr(serve, "SERVE_PACKAGES", ("fastapi", "no_such_package_longrope"))
    code, _, err = run_main(["serve", "some-model", "--port", 8000], capsys)
    assert_one_line_error(code, err, "no_such_package_longrope", "longrope_triton[serve]")


# ---------------------------------------------------------------------------- error paths
def test_missing_model(tmp_path, capsys):
    code, _, err = run_main(["search", "--model", tmp_path / "nope", "--target", 64, "--log", tmp_path / "l.jsonl",
                             "-o", tmp_path / "f.json"], capsys)
    assert_one_line_error(code, err, "not found")


def test_missing_text(tmp_path, tiny_model_dir, capsys):
    code, _, err = run_main(["eval", "--model", tiny_model_dir, "--text", tmp_path / "missing.txt",
                             "--methods", "plain", "--lengths", 32], capsys)
    assert_one_line_error(code, err, "missing.txt", "not found")


def test_length_beyond_factor_set(tmp_path, capsys):
    from longrope_triton import LongRoPEConfig
    factors = tmp_path / "f.json"
    factors.write_text(LongRoPEConfig.pi(64, 8192, 16384, base=1e5).to_json())
    code, _, err = run_main(["eval", "--methods", "longrope", "--factors", factors, "--lengths", "8192,65536"], capsys)
    assert_one_line_error(code, err, "65536", "max_position_embeddings")


def test_length_beyond_config_for_passkey(tmp_path, tiny_model_dir, capsys):
    factors = tmp_path / "f.json"
    from longrope_triton import LongRoPEConfig
    factors.write_text(LongRoPEConfig.pi(16, 32, 64).to_json())
    code, _, err = run_main(["passkey", "--model", tiny_model_dir, "--method", "longrope", "--factors", factors,
                             "--lengths", 128], capsys)
    assert_one_line_error(code, err, "128", "max_position_embeddings")


def test_demo_argument_errors(capsys):
    code, _, err = run_main(["demo", "--novel", "persuasion"], capsys)  # a search novel is not held out
    assert_one_line_error(code, err, "held-out")
    code, _, err = run_main(["demo", "--length", 65536], capsys)
    assert_one_line_error(code, err, "65536", "max_position_embeddings")


def test_corrupt_search_log(tmp_path, capsys):
    log = tmp_path / "bad.jsonl"
    log.write_text('{"type": "header"}\nnot json\n')
    code, _, err = run_main(["search", "--target", 16384, "--log", log, "-o", tmp_path / "f.json"], capsys)
    assert_one_line_error(code, err, "bad.jsonl:2", "corrupt")


def test_unknown_method_and_bad_list(capsys):
    code, _, err = run_main(["eval", "--methods", "plain,rope", "--lengths", "1024"], capsys)
    assert_one_line_error(code, err, "rope")
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--lengths", "4k"])
    assert exc.value.code == 2


# ---------------------------------------------------------------------------- end to end on a tiny model
def test_search_eval_export_end_to_end(tmp_path, tiny_model_dir, text_file, capsys):
    log, out = tmp_path / "search.jsonl", tmp_path / "factors.json"
    args = ["search", "--model", tiny_model_dir, "--text", text_file, "--target", 64, "--score-tokens", 16,
            "--population", 4, "--iterations", 1, "--start-tokens", "0,2", "--backend", "stock",
            "--log", log, "-o", out]
    code, stdout, err = run_main(args, capsys)
    assert code == 0, err
    summary = json.loads(stdout[stdout.index("{"):])
    assert summary["evaluations"] == len(log.read_text().splitlines()) - 1
    from longrope_triton import LongRoPEConfig
    cfg = LongRoPEConfig.from_json(out)
    assert cfg.max_position_embeddings == 64 and cfg.original_max_position_embeddings == 32
    hf = json.loads(out.with_name("factors.hf.json").read_text())
    assert hf["rope_parameters"]["rope_type"] == "longrope"

    # resume: nothing evaluated again
    code, stdout, err = run_main(args, capsys)
    assert code == 0 and json.loads(stdout[stdout.index("{"):])["resumed"] == summary["evaluations"]

    # same log, another target: a clear error
    code, _, err = run_main([a if a != 64 else 96 for a in args], capsys)
    assert_one_line_error(code, err, "different search")

    # eval with the found factors
    code, stdout, err = run_main(["eval", "--model", tiny_model_dir, "--text", text_file, "--methods",
                                  "plain,yarn,longrope", "--factors", out, "--lengths", "32,64", "--score-tokens", 8,
                                  "--backend", "stock", "--out", tmp_path / "ev"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "ev.json").read_text())
    assert {(r["method"], r["length"]) for r in record["rows"]} >= {("plain", 32), ("longrope", 64)}
    assert (tmp_path / "ev.png").is_file()

    # export into the model directory's config (a copy)
    import shutil
    model_copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_copy)
    code, stdout, err = run_main(["export", "--factors", out, "--model-dir", model_copy], capsys)
    assert code == 0, err
    config = json.loads((model_copy / "config.json").read_text())
    assert config["max_position_embeddings"] == 64
    assert config["rope_parameters"]["long_factor"] == cfg.long_factor
    from transformers import AutoConfig
    assert LongRoPEConfig.from_hf(AutoConfig.from_pretrained(model_copy)).long_factor == pytest.approx(cfg.long_factor)


def test_passkey_command(tmp_path, tiny_model_dir, capsys):
    code, stdout, err = run_main(["passkey", "--model", tiny_model_dir, "--method", "pi", "--lengths", "400",
                                  "--target", 512, "--depths", "0.5", "--backend", "stock", "--out",
                                  tmp_path / "pk"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "pk.json").read_text())
    assert record["accuracy"][0]["length"] == 400 and (tmp_path / "pk.png").is_file()


def test_finetune_command(tmp_path, tiny_model_dir, text_file, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the loop, not the kernels (see test_eval.py::torch_path)
    from longrope_triton import LongRoPEConfig
    factors = tmp_path / "f.json"
    factors.write_text(LongRoPEConfig.longrope(16, 32, 64, long_factor=[1.5] * 8).to_json())
    args = ["finetune", "--model", tiny_model_dir, "--text", text_file, "--factors", factors, "--steps", 1,
            "--long-tokens", 40, "--short-tokens", 8, "--shorts-per-row", 1, "--checkpoint", tmp_path / "ckpt",
            "--save-every", 1, "--no-checkpointing"]
    code, stdout, err = run_main(args, capsys)
    assert code == 0, err
    assert (tmp_path / "ckpt" / "checkpoint.pt").is_file()
    code, stdout, err = run_main([a if a != 1 else 2 for a in args], capsys)
    assert code == 0 and "resumed from step 1" in stdout
