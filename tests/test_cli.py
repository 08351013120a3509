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
        "--out", profile, "--plot", root / "profile.png", "--device", "cpu",
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

    results = root / "eval.json"
    code, output = run(
        "eval", out, "--against", model, "--corpora", corpus, "--seq-len", 32,
        "--max-tokens", 256, "--json", results, "--device", "cpu",
    )  # fmt: skip
    assert code == 0, output
    reports = json.loads(results.read_text())
    assert set(reports) == {str(out), str(model)}
    compressed, dense = reports[str(out)], reports[str(model)]
    assert compressed["ffn_bytes"] < dense["ffn_bytes"]
    ppl_c = next(iter(compressed["perplexity"].values()))["ppl"]
    ppl_d = next(iter(dense["perplexity"].values()))["ppl"]
    assert 0.5 < ppl_c / ppl_d < 2.0


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


def test_models_lists_the_packaged_models() -> None:
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
