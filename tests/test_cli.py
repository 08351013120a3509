"""The command line end to end on a tiny saved model, and every bad input as a one-line error."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ffnsplit.cli import app
from tests.test_data import word_tokenizer
from tests.tiny_models import tiny_model

runner = CliRunner()
WORDS = [f"w{i}" for i in range(100)]


def run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def assert_one_line_error(code: int, output: str, *needles: str) -> None:
    assert code == 2, output
    assert "Traceback" not in output
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error:"), output
    for needle in needles:
        assert needle in " ".join(lines), output


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny llama + word tokenizer saved as an HF folder, and a text corpus it can read."""
    root = tmp_path_factory.mktemp("cli")
    rng = random.Random(0)
    corpus = root / "corpus.txt"
    corpus.write_text(
        "\n".join(" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(60)) + "\n"
    )
    model = tiny_model("llama")
    tokenizer = word_tokenizer([" ".join(WORDS)])
    assert len(tokenizer) <= model.config.vocab_size
    folder = root / "tiny-llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"root": root, "model": folder, "corpus": corpus}


def test_profile_compress_eval_info_pipeline(workspace: dict[str, Path]) -> None:
    root, model, corpus = workspace["root"], workspace["model"], workspace["corpus"]
    profile = root / "profile.safetensors"
    code, output = run(
        "profile", model, "--corpus", corpus, "--tokens", 512, "--seq-len", 32,
        "--out", profile, "--plot", root / "profile.png", "--device", "cpu", "--overwrite",
    )  # fmt: skip
    assert code == 0, output
    assert profile.is_file() and (root / "profile.png").is_file()
    code, output = run("profile", "--show", profile)
    assert code == 0 and "top 5%" in output, output

    out = root / "compressed"
    code, output = run(
        "compress", model, "--profile", profile, "--out", out, "--light", "int4-g32",
        "--heavy-fraction", 0.1, "--device", "cpu",
    )  # fmt: skip
    assert code == 0, output
    assert (out / "config.json").is_file() and (out / "plan.json").is_file()
    code, output = run("compress", model, "--profile", profile, "--out", out)
    assert_one_line_error(code, output, "--overwrite")

    code, output = run("info", out)
    assert code == 0 and "split" in output, output
    from ffnsplit import api

    dense, compressed = (api.model_info(api.open_model(str(p))[0]) for p in (model, out))
    # nothing pruned: the split FFNs stand for the dense parameters, stored in fewer bytes
    assert compressed.ffn_parameters == dense.ffn_parameters
    assert compressed.total_parameters == dense.total_parameters
    assert compressed.ffn_bytes < dense.ffn_bytes

    results = root / "eval.json"
    code, output = run(
        "eval", out, "--against", model, "--corpora", corpus, "--seq-len", 32,
        "--max-tokens", 256, "--json", results, "--device", "cpu",
    )  # fmt: skip
    assert code == 0, output
    assert "causal LMs only" not in output  # the encoder note is for encoders
    reports = json.loads(results.read_text())
    assert set(reports) == {str(out), str(model)}
    compressed, dense = reports[str(out)], reports[str(model)]
    assert compressed["ffn_bytes"] < dense["ffn_bytes"]
    ppl_c = next(iter(compressed["perplexity"].values()))["ppl"]
    ppl_d = next(iter(dense["perplexity"].values()))["ppl"]
    assert 0.5 < ppl_c / ppl_d < 2.0

    # the same checkpoint with int8 light activations, beside itself (W4A8)
    code, output = run(
        "eval", out, "--against", out, "--light-act", "int8", "--corpora", corpus,
        "--seq-len", 32, "--max-tokens", 256, "--json", results, "--overwrite", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, output
    reports = json.loads(results.read_text())
    assert set(reports) == {str(out), f"{out} (int8 light act.)"}
    ppl_8 = next(iter(reports[f"{out} (int8 light act.)"]["perplexity"].values()))["ppl"]
    assert ppl_8 != ppl_c and abs(ppl_8 / ppl_c - 1) < 0.05

    completions = root / "generate.json"
    code, output = run(
        "generate", out, "--against", model, "-p", "w3 w9 w27", "-p", "w81 w43",
        "--max-new-tokens", 6, "--json", completions, "--device", "cpu",
    )  # fmt: skip
    assert code == 0, output
    assert "prompt 2" in output and "static decoder" in output and "tokens as" in output
    payload = json.loads(completions.read_text())
    assert payload["prompts"] == ["w3 w9 w27", "w81 w43"] and payload["max_new_tokens"] == 6
    assert list(payload["models"]) == [str(out), str(model)]
    for entry in payload["models"].values():
        assert entry["dtype"] == "float32" and len(entry["completions"]) == 2
        for c in entry["completions"]:
            assert 1 <= len(c["tokens"]) <= 6 and c["stop"] in ("eos", "length")
            assert c["prompt_tokens"] == (3 if c["prompt"] == "w3 w9 w27" else 2)


def test_budget_mode_and_baselines(workspace: dict[str, Path]) -> None:
    root, model, corpus = workspace["root"], workspace["model"], workspace["corpus"]
    profile = root / "profile-budget.safetensors"
    assert run("profile", model, "--corpus", corpus, "--tokens", 256, "--seq-len", 32,
               "--out", profile, "--device", "cpu")[0] == 0  # fmt: skip
    for extra in (["--target-bits", "5"], ["--baseline", "uniform"], ["--baseline", "random"],
                  ["--baseline", "weight-norm"]):  # fmt: skip
        out = root / f"c{'-'.join(extra)}"
        code, output = run("compress", model, "--profile", profile, "--out", out, *extra)
        assert code == 0, output
        report = json.loads((out / "size_report.json").read_text())
        if extra[0] == "--target-bits":
            assert report["average_ffn_bits"] <= 5.0
    code, output = run(
        "compress", model, "--profile", profile, "--out", root / "x", "--target-bits", "0.5"
    )
    assert_one_line_error(code, output)
    assert not (root / "x").exists()


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["info", "/no/such/folder"], ["no such model folder"]),
        (
            ["profile", "{model}", "--corpus", "{empty}", "--out", "{root}/p.safetensors"],
            ["no text"],
        ),
        (["profile", "{model}", "--corpus", "/no/such.txt"], []),
        (["profile", "{model}", "--corpus", "{corpus}", "--tokens", "100000000"], ["tokens"]),
        (["profile", "{model}", "--device", "cuda:7"], []),
        (
            [
                "profile",
                "{model}",
                "--topk",
                "1.5",
                "--corpus",
                "{corpus}",
                "--tokens",
                "256",
                "--seq-len",
                "32",
            ],
            ["(0, 1]"],
        ),  # fmt: skip
        (["compress", "{model}", "--profile", "/no/profile.safetensors", "--out", "{root}/o"], []),
        (
            [
                "compress",
                "{model}",
                "--profile",
                "{root}/profile.safetensors",
                "--light",
                "int5-g64",
                "--out",
                "{root}/o",
            ],
            ["bit width 5"],
        ),  # fmt: skip
        (
            [
                "compress",
                "{model}",
                "--profile",
                "{root}/profile.safetensors",
                "--heavy-fraction",
                "1.5",
                "--out",
                "{root}/o",
            ],
            ["outside"],
        ),  # fmt: skip
        (
            [
                "compress",
                "{model}",
                "--profile",
                "{root}/profile.safetensors",
                "--baseline",
                "magic",
                "--out",
                "{root}/o",
            ],
            ["baseline"],
        ),  # fmt: skip
        (["eval", "{notmodel}"], ["config.json"]),
        (["generate", "{model}", "--device", "cpu"], ["--prompt"]),
        (["generate", "{model}", "-p", "w1", "--max-new-tokens", "0"], ["at least 1"]),
        (["generate", "{model}", "-p", "w1", "--max-new-tokens", "70"], ["64 positions"]),
        (["generate", "{model}", "-p", "w1", "--chat"], ["no chat template"]),
        (["generate", "{model}", "-p", "w1", "--decoder", "beam"], ["unknown decoder"]),
        (["generate", "minilm-l6", "-p", "w1"], ["encoder"]),
        (["generate", "{model}", "-p", "w1", "--json", "{root}/o/x.json"], ["o"]),
    ],
)
def test_bad_inputs_are_one_line_errors(
    workspace: dict[str, Path], args: list[str], needles: list[str]
) -> None:
    root = workspace["root"]
    empty = root / "empty.txt"
    empty.write_text("   \n\n")
    notmodel = root / "notmodel"
    notmodel.mkdir(exist_ok=True)
    if not (root / "profile.safetensors").exists():
        test_profile_compress_eval_info_pipeline(workspace)
    values = {"model": workspace["model"], "corpus": workspace["corpus"], "root": root,
              "empty": empty, "notmodel": notmodel}  # fmt: skip
    code, output = run(*(a.format(**values) for a in args))
    assert_one_line_error(code, output, *needles)
    assert not (root / "o").exists()


def test_profile_of_another_model_is_refused(workspace: dict[str, Path], tmp_path: Path) -> None:
    root = workspace["root"]
    if not (root / "profile.safetensors").exists():
        test_profile_compress_eval_info_pipeline(workspace)
    other = tiny_model("llama", seed=1)
    folder = tmp_path / "other"
    other.save_pretrained(folder)
    word_tokenizer([" ".join(WORDS)]).save_pretrained(folder)
    code, output = run(
        "compress", folder, "--profile", root / "profile.safetensors", "--out", tmp_path / "o"
    )
    assert_one_line_error(code, output, "another model")


def test_unsupported_and_remote_code_models(tmp_path: Path) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
    )  # fmt: skip
    moe = tmp_path / "moe"
    MixtralForCausalLM(config).save_pretrained(moe)
    code, output = run("info", moe)
    assert_one_line_error(code, output, "supported")

    remote = tmp_path / "remote"
    tiny_model("llama").save_pretrained(remote)
    config_file = remote / "config.json"
    data = json.loads(config_file.read_text())
    data["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    config_file.write_text(json.dumps(data))
    code, output = run("info", remote)
    assert_one_line_error(code, output, "--trust-remote-code")


def test_corrupt_and_newer_checkpoints(workspace: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    root = workspace["root"]
    if not (root / "compressed").exists():
        test_profile_compress_eval_info_pipeline(workspace)
    truncated = tmp_path / "truncated"
    shutil.copytree(root / "compressed", truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, output = run("info", truncated)
    assert_one_line_error(code, output, "corrupt")

    newer = tmp_path / "newer"
    shutil.copytree(root / "compressed", newer)
    config = json.loads((newer / "config.json").read_text())
    config["quantization_config"]["format_version"] += 1
    (newer / "config.json").write_text(json.dumps(config))
    code, output = run("info", newer)
    assert_one_line_error(code, output, "upgrade ffnsplit")


@pytest.mark.parametrize("columns", [None, "60"])
def test_models_lists_the_packaged_models(monkeypatch, columns) -> None:
    """Every packaged name in full, cached or not, on a narrow terminal too (a long cell had
    cut "smollm2-135m" to "smollm2-13…" before the model was first converted)."""
    if columns:
        monkeypatch.setenv("COLUMNS", columns)
    code, output = run("models")
    assert code == 0
    for name in ("smollm2-135m", "gemma3-270m", "minilm-l6"):
        assert name in output


def test_nan_weights_name_the_layer(tmp_path: Path, workspace: dict[str, Path]) -> None:
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    folder = tmp_path / "nan"
    model.save_pretrained(folder)
    word_tokenizer([" ".join(WORDS)]).save_pretrained(folder)
    code, output = run(
        "profile", folder, "--corpus", workspace["corpus"], "--tokens", 256, "--seq-len", 32,
        "--out", tmp_path / "p.safetensors", "--device", "cpu",
    )  # fmt: skip
    assert_one_line_error(code, output, "layer 1")
    assert not (tmp_path / "p.safetensors").exists()


def _digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_inputs_give_byte_identical_files(workspace: dict[str, Path], tmp_path: Path) -> None:
    """Determinism: two runs with the same model, corpus, options and seed write the same bytes."""
    model, corpus = workspace["model"], workspace["corpus"]
    digests = []
    for run_index in range(2):
        root = tmp_path / f"run{run_index}"
        profile = root / "profile.safetensors"
        out = root / "compressed"
        assert run("profile", model, "--corpus", corpus, "--tokens", 256, "--seq-len", 32,
                   "--out", profile, "--device", "cpu", "--seed", 3)[0] == 0  # fmt: skip
        code, output = run(
            "compress", model, "--profile", profile, "--out", out, "--light", "int3-g32-gptq",
            "--heavy-fraction", 0.1, "--calib-corpus", corpus, "--calib-tokens", 256,
            "--seq-len", 32, "--device", "cpu",
        )  # fmt: skip
        assert code == 0, output
        files = sorted(p for p in out.iterdir() if p.is_file())
        digests.append([_digest(profile)] + [(p.name, _digest(p)) for p in files])
    assert digests[0] == digests[1]


def test_out_of_memory_says_what_to_change(monkeypatch: pytest.MonkeyPatch) -> None:
    from ffnsplit import api

    def exhausted(*_args, **_kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(api, "profile", exhausted)
    code, output = run("profile", "smollm2-135m")
    assert_one_line_error(code, output, "--batch-size", "--sequential")


def test_outputs_are_checked_before_any_work(workspace: dict[str, Path]) -> None:
    """Every output is refused up front, under its real name: an existing one without
    --overwrite, a folder where a file goes and the reverse, a parent that is a file."""
    root, model = workspace["root"], workspace["model"]
    existing = root / "existing.json"
    existing.write_text("{}")
    cases = [
        (["profile", model, "--out", existing], ["already exists", "--overwrite"]),
        (["profile", model, "--out", root / "p.safetensors", "--plot", existing], ["--overwrite"]),
        (["profile", model, "--out", root / "p.safetensors", "--plot", root / "x.bmp"],
         ["cannot draw a .bmp image", ".png, .pdf, .svg or .jpg"]),
        (["eval", model, "--json", existing], ["already exists"]),
        (["eval", model, "--json", root, "--overwrite"], [f"{root} is a folder", "--json"]),
        (["compress", model, "--profile", existing, "--out", existing / "sub"],
         ["is a file, not a folder"]),
        (["compress", model, "--profile", existing, "--out", existing, "--overwrite"],
         ["is a file: give a folder path for --out"]),
        (["sweep", model, "--profile", existing, "--out", root], ["already exists"]),
        (["bench", "--device", "cpu", "--json", existing], ["already exists"]),
        (["demo", model, "--out", root], ["already exists", "--overwrite"]),
    ]  # fmt: skip
    for args, needles in cases:
        assert_one_line_error(*run(*args), *needles)
        assert existing.read_text() == "{}"
    assert not (root / "p.safetensors").exists()


def test_option_mistakes_found_before_the_work(workspace: dict[str, Path]) -> None:
    root, model = workspace["root"], workspace["model"]
    if not (root / "profile.safetensors").exists():
        test_profile_compress_eval_info_pipeline(workspace)
    profile = root / "profile.safetensors"
    code, output = run("compress", model, "--profile", profile, "--heavy-dtype", "int8",
                       "--out", root / "o")  # fmt: skip
    assert_one_line_error(code, output, "unknown --heavy-dtype 'int8'", "float16")
    code, output = run("sweep", model, "--profile", profile, "--out", root / "sw", "--points", ",")
    assert_one_line_error(code, output, "--points is empty")
    code, output = run("eval", model, "--seq-len", 0)
    assert_one_line_error(code, output, "--seq-len must be at least 2")
    code, output = run("profile", model, "--tokens", 0, "--out", root / "p0.safetensors")
    assert_one_line_error(code, output, "--tokens must be at least 1 (got 0)")
    code, output = run("compress", model, "--profile", profile, "--baseline", "uniform",
                       "--heavy-fraction", 0.1, "--out", root / "o")  # fmt: skip
    assert_one_line_error(code, output, "--heavy-fraction", "--baseline")
    assert not (root / "o").exists() and not (root / "sw").exists()


def test_a_failure_inside_the_progress_is_the_only_line(workspace: dict[str, Path]) -> None:
    """The bars drawn before a failure are cleared: the error line stands alone."""
    root, model = workspace["root"], workspace["model"]
    code, output = run("profile", model, "--corpus", root / "no-such-corpus.txt",
                       "--out", root / "p1.safetensors", "--device", "cpu")  # fmt: skip
    assert_one_line_error(code, output)
    assert [line for line in output.splitlines() if line.strip()] == [output.strip()]


def test_demo_leaves_nothing_when_a_step_fails(
    workspace: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ffnsplit import api
    from ffnsplit.errors import FFNSplitError

    root, model = workspace["root"], workspace["model"]
    out = root / "demo"
    for args, needles in ((["--light", "int5-g128"], ["bit width 5"]),
                          (["--heavy-fraction", 2], ["outside"])):  # fmt: skip
        code, output = run("demo", model, "--out", out, *args)
        assert_one_line_error(code, output, *needles)
        assert not out.exists()
    assert_one_line_error(*run("demo", root / "no-such-model", "--out", out))
    assert not out.exists()

    def broken(*args, **kwargs):
        raise FFNSplitError("compress failed on purpose")

    monkeypatch.setattr(api, "compress", broken)
    demo = ["demo", model, "--out", out, "--tokens", 1024, "--device", "cpu"]
    assert_one_line_error(*run(*demo), "on purpose")
    assert not out.exists()  # the profile of step 1 went with it
    out.mkdir()
    (out / "earlier").write_text("an earlier run")
    assert_one_line_error(*run(*demo, "--overwrite"), "on purpose")
    assert sorted(p.name for p in out.iterdir()) == ["earlier"]
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".demo")) == []


def test_eval_refuses_a_causal_lm_beside_an_encoder(workspace: dict[str, Path]) -> None:
    root, model = workspace["root"], workspace["model"]
    encoder = root / "tiny-bert"
    if not encoder.exists():
        tiny_model("bert").save_pretrained(encoder)
    code, output = run("eval", model, "--against", encoder)
    assert_one_line_error(code, output, "causal LM", "encoder", "share no metric")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["compress", "--heavy-fraction", "abc"], "'--heavy-fraction'"),
        (["compress", "--foo"], "No such option: --foo"),
        (["info", "minilm-l6", "extra"], "extra"),
    ],
)
def test_command_line_mistakes_are_one_line(capsys, args: list[str], needle: str) -> None:
    from ffnsplit.cli import main

    assert main(args) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], captured.err
    assert "--help" in lines[0] and "Traceback" not in captured.err


def test_no_arguments_prints_the_help(capsys) -> None:
    from ffnsplit.cli import main

    assert main([]) == 0
    assert "profile" in capsys.readouterr().out


def test_overwrite_never_destroys_an_input(workspace: dict[str, Path], monkeypatch) -> None:
    """--overwrite onto the model folder, the profile, or a folder holding the current one is
    refused: replacing it would delete what the command reads."""
    root, model = workspace["root"], workspace["model"]
    if not (root / "profile.safetensors").exists():
        test_profile_compress_eval_info_pipeline(workspace)
    profile = root / "profile.safetensors"
    compress = ["compress", model, "--profile", profile, "--overwrite", "--out"]
    assert_one_line_error(*run(*compress, model), "is or holds", "choose another --out")
    assert_one_line_error(*run(*compress, root), "is or holds")
    here = root / "elsewhere" / "here"
    here.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(here)
    for out in (".", "..", ""):
        assert_one_line_error(*run(*compress, out), "the current folder")
    assert (model / "config.json").is_file() and profile.is_file() and here.is_dir()


def test_mistakes_in_later_steps_are_found_first(workspace: dict[str, Path], monkeypatch) -> None:
    """Option values used late in a run (sweep points and methods, eval corpora and counts) are
    checked before any model is loaded: a missing model is not even reached."""
    root = workspace["root"]
    missing = root / "no-such-model"
    profile = root / "no-such-profile.safetensors"
    sweep = ["sweep", missing, "--profile", profile, "--out", root / "sw"]
    cases = [
        (sweep + ["--points", "int4-g64,lowrank-r8"], "quantized formats"),
        (sweep + ["--methods", "uniform,nosuch"], "unknown sweep method 'nosuch'"),
        (sweep + ["--points", "int4-g128"], "group 32 or 64"),
        (["eval", missing, "--corpora", "wiki-eval,nosuch"], "nosuch"),
        (["eval", missing, "--max-tokens", 0], "--max-tokens must be at least 1"),
        (["eval", missing, "--batch-size", 0], "--batch-size must be at least 1"),
    ]
    for args, needle in cases:
        assert_one_line_error(*run(*args), needle)
    # a point at group 128 is fine when no method takes a heavy set; the missing profile is next
    assert_one_line_error(*run(*sweep, "--points", "int4-g128", "--methods", "uniform"), "profile")
    monkeypatch.setenv("FFNSPLIT_CACHE", str(root / "corpus.txt"))
    assert_one_line_error(*run("info", "smollm2-135m"), "FFNSPLIT_CACHE", "is a file")


def test_output_paths_expand_the_home_folder(workspace: dict[str, Path], monkeypatch) -> None:
    home = workspace["root"] / "home"
    home.mkdir(exist_ok=True)
    (home / "p.safetensors").write_text("an earlier profile")
    monkeypatch.setenv("HOME", str(home))
    code, output = run("profile", workspace["model"], "--out", "~/p.safetensors")
    assert_one_line_error(code, output, f"{home / 'p.safetensors'} already exists")
    assert not (Path.cwd() / "~").exists()
