"""Greedy generation (ffnsplit/generate.py): the static decoder gives the model's own greedy
tokens, stops at a stop token across its host checks, refuses what it cannot run in one line;
a real SmolLM2 and a compressed copy of it answer a question alike."""

from __future__ import annotations

import pytest
import torch

from ffnsplit import generate as gen
from ffnsplit.errors import OptionError, UnsupportedModelError
from tests.test_data import word_tokenizer
from tests.tiny_models import tiny_model

WORDS = [f"w{i}" for i in range(100)]
PROMPT = "w5 w17 w3 w42 w8"


def tiny(family: str):
    model = tiny_model(family).eval()
    tokenizer = word_tokenizer([" ".join(WORDS)])
    assert len(tokenizer) <= model.config.vocab_size
    return model, tokenizer


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_static_decoder_tokens_are_the_models_greedy_generate(family: str) -> None:
    model, tokenizer = tiny(family)
    static, hf = (
        gen.generate(
            model, tokenizer, [PROMPT, "w1"], max_new_tokens=20, decoder=decoder, chat=False
        )  # fmt: skip
        for decoder in ("static", "hf")
    )
    for s, h in zip(static, hf, strict=True):
        assert (s.decoder, h.decoder) == ("static", "hf")
        assert s.tokens == h.tokens and s.stop == h.stop and s.text == h.text
        assert s.prompt_tokens == len(tokenizer(s.prompt).input_ids)
        assert s.timing == "eager-cpu" and s.prefill_ms > 0
        assert s.decode_tokens_per_s is None or s.decode_tokens_per_s > 0
        if s.stop == "length":
            assert len(s.tokens) == 20


def test_a_stop_token_ends_the_completion_across_host_checks(monkeypatch) -> None:
    """A stop token inside the second batch of steps the host looks at: the completion ends
    with it (kept last), though the decoder ran to the end of that batch."""
    model, tokenizer = tiny("llama")
    ids = gen.prompt_ids(tokenizer, PROMPT, False, torch.device("cpu"))
    with torch.no_grad():
        free, stop, *_ = gen.generate_static(model, ids, 16, set())
    assert stop == "length" and len(free) == 16
    monkeypatch.setattr(gen, "CHECK_EVERY", 3)
    at = next(i for i in range(5, 16) if free[i] not in free[:i])  # its first occurrence
    with torch.no_grad():
        tokens, stop, _, _, rate = gen.generate_static(model, ids, 16, {free[at]})
        hf, hf_stop, _ = gen.generate_hf(model, ids, 16, {free[at]}, None)
    assert (tokens, stop) == (free[: at + 1], "eos")
    assert (hf, hf_stop) == (tokens, stop)
    assert rate > 0
    with torch.no_grad():  # a stop as the first token: no decode step at all
        tokens, stop, _, _, rate = gen.generate_static(model, ids, 16, {free[0]})
    assert (tokens, stop, rate) == ([free[0]], "eos", None)


def test_other_decoders_take_the_models_generate() -> None:
    model, tokenizer = tiny("gemma3_text")
    (c,) = gen.generate(model, tokenizer, [PROMPT], max_new_tokens=6, chat=False)
    assert (c.decoder, c.timing, c.prefill_ms) == ("hf", "hf-generate", None)
    assert 1 <= len(c.tokens) <= 6 and c.decode_tokens_per_s > 0
    with pytest.raises(UnsupportedModelError, match="--decoder hf"):
        gen.generate(model, tokenizer, [PROMPT], decoder="static")


def test_mistakes_are_refused_before_any_token() -> None:
    model, tokenizer = tiny("llama")
    with pytest.raises(OptionError, match="at least 1"):
        gen.generate(model, tokenizer, [PROMPT], max_new_tokens=0)
    with pytest.raises(OptionError, match="--prompt"):
        gen.generate(model, tokenizer, [])
    with pytest.raises(OptionError, match="64 positions"):  # the second prompt is too long
        gen.generate(model, tokenizer, [PROMPT, " ".join(WORDS[:60])], max_new_tokens=8)
    with pytest.raises(OptionError, match="no chat template"):
        gen.generate(model, tokenizer, [PROMPT], chat=True)
    with pytest.raises(OptionError, match="unknown decoder"):
        gen.generate(model, tokenizer, [PROMPT], decoder="beam")
    with pytest.raises(OptionError, match="no tokens"):
        gen.generate(model, tokenizer, [""], chat=False)


def test_agreement_counts_leading_tokens() -> None:
    assert gen.agreement([1, 2, 3], [1, 2, 4, 5]) == 2
    assert gen.agreement([1, 2], [1, 2, 3]) == 2 and gen.agreement([], [1]) == 0


@pytest.mark.slow
def test_smollm2_and_its_compressed_copy_answer_alike(cache_dir) -> None:
    """The packaged SmolLM2-135M-Instruct through its chat template, and a copy with every FFN
    split (20% random heavy neurons in fp32, the rest int8 g64 RTN): both name Paris."""
    from ffnsplit.eval.bench import random_plan, split_model_
    from ffnsplit.models import load_model
    from ffnsplit.plan import parse_light_format

    model, tokenizer = load_model("smollm2-135m", dtype=torch.float32)
    prompt = ["What is the capital of France? Answer in one sentence."]
    (dense,) = gen.generate(model, tokenizer, prompt, max_new_tokens=12)
    assert dense.decoder == "static" and dense.prompt_tokens > 20  # the template's system turn
    assert "Paris" in dense.text, dense.text
    plan = random_plan(model, heavy_fraction=0.2, light=parse_light_format("int8-g64"),
                       heavy_dtype="float32")  # fmt: skip
    split_model_(model, plan)
    (split,) = gen.generate(model, tokenizer, prompt, max_new_tokens=12)
    assert "Paris" in split.text, split.text
    assert gen.agreement(dense.tokens, split.tokens) >= 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_static_generation_replays_a_cuda_graph_with_the_models_tokens() -> None:
    """On a GPU the static decoder's steps are CUDA-graph replays writing each token into a
    device buffer; in fp32 its tokens are those of the model's own greedy generate."""
    model, tokenizer = tiny("llama")
    model.to("cuda")
    prompts = [PROMPT, "w1 w2"]
    static, hf = (
        gen.generate(model, tokenizer, prompts, max_new_tokens=24, decoder=decoder, chat=False)
        for decoder in ("static", "hf")
    )
    for s, h in zip(static, hf, strict=True):
        assert s.timing == "cuda-graph" or s.decode_tokens_per_s is None
        assert s.tokens == h.tokens and s.stop == h.stop


def test_completions_are_compared_only_under_one_tokenizer(monkeypatch) -> None:
    from rich.console import Console

    from ffnsplit import cli

    def completion(tokens: list[int], prompt_ids: list[int]) -> gen.Completion:
        return gen.Completion("hi", " text\n", len(prompt_ids), tokens, "length", "static",
                              "eager-cpu", 1.0, 2.0, prompt_ids)  # fmt: skip

    console = Console(record=True, width=200)
    monkeypatch.setattr(cli, "console", console)
    cli._print_completions({"a": [completion([1, 2, 3], [7, 8])],
                            "b": [completion([1, 2, 4], [7, 8])],
                            "c": [completion([1, 2, 3], [9])]})  # fmt: skip
    text = console.export_text()
    assert "its first 2 of 3 tokens as a's" in text
    assert "another tokenizer or template: tokens not compared" in text
    assert "prefill 1.0 ms for 2 tokens" in text and "decode 2.0 tok/s" in text
