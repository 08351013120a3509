"""Evaluation library: perplexity protocol, polarity scoring, similarity, sizes, reports, table."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from rich.console import Console
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast

from ffnsplit import arch
from ffnsplit.errors import CorpusError, NumericalError, OptionError, UnsupportedModelError
from ffnsplit.eval.compare import (
    EvalReport,
    comparison_table,
    evaluate,
    ffn_bytes,
    total_bytes,
)
from ffnsplit.eval.perplexity import PerplexityResult, perplexity
from ffnsplit.eval.tasks import (
    PolarityResult,
    SimilarityResult,
    continuation_logprobs,
    embed_documents,
    is_causal_lm,
    polarity_accuracy,
    similarity_spearman,
    spearman,
)
from ffnsplit.kernels.format import SplitFFNWeights
from ffnsplit.modules import SplitFFN
from tests.tiny_models import FAMILIES, tiny_model

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs!",
    "How vexingly quick daft zebras jump; sphinx of black quartz, judge my vow.",
]
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))


def char_tokenizer(with_bos: bool = True) -> PreTrainedTokenizerFast:
    """One token per character (ids < 100, so it fits the tiny models' vocab of 128)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({c: i + 4 for i, c in enumerate(CHARS)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    special = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    if with_bos:
        special["bos_token"] = "<s>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    return tiny_model("llama")


def brute_force_nll(model, tokenizer, texts, seq_len, max_tokens) -> tuple[float, int, int]:
    """The protocol written out plainly: one forward pass per predicted token."""
    stream = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    total, count, windows, position = 0.0, 0, 0, 0
    while count < max_tokens:
        if bos is not None:
            take = min(seq_len - 1, max_tokens - count, len(stream) - position)
            window = [bos] + stream[position : position + take]
        else:
            take = min(seq_len - 1, max_tokens - count, len(stream) - position - 1)
            window = stream[position : position + take + 1]
        if take < 1:
            break
        position += len(window) - (bos is not None)
        windows += 1
        for t in range(1, len(window)):
            with torch.no_grad():
                logits = model(torch.tensor([window[:t]])).logits[0, -1].double()
            total -= F.log_softmax(logits, -1)[window[t]].item()
            count += 1
    return total / count, count, windows


@pytest.mark.parametrize("with_bos", [True, False])
def test_perplexity_matches_brute_force(llama, with_bos):
    tokenizer = char_tokenizer(with_bos)
    result = perplexity(llama, tokenizer, TEXTS, seq_len=16, max_tokens=40, batch_size=2)
    nll, count, windows = brute_force_nll(llama, tokenizer, TEXTS, 16, 40)
    assert (result.tokens, result.windows) == (count, windows) == (40, 3)
    assert result.nll == pytest.approx(nll, abs=1e-5)
    assert result.ppl == pytest.approx(math.exp(nll), rel=1e-5)


@pytest.mark.parametrize(
    ("with_bos", "seq_len", "max_tokens"),
    [(True, 16, 45), (True, 16, None), (False, 16, None), (False, 10, 1), (True, 64, 10**6)],
)
def test_perplexity_counts_predicted_tokens(llama, with_bos, seq_len, max_tokens):
    tokenizer = char_tokenizer(with_bos)
    stream = len("\n\n".join(TEXTS))  # one token per character
    result = perplexity(llama, tokenizer, TEXTS, seq_len=seq_len, max_tokens=max_tokens)
    if with_bos:  # every stream token is predicted once, after a BOS per window
        available = stream
    else:  # each window's first token is context only; a last lone token predicts nothing
        full, rest = divmod(stream, seq_len)
        available = full * (seq_len - 1) + max(rest - 1, 0)
    expected = available if max_tokens is None else min(available, max_tokens)
    assert result.tokens == expected
    assert result.windows == math.ceil(expected / (seq_len - 1))


def test_perplexity_is_batch_invariant_and_restores_mode(llama):
    tokenizer = char_tokenizer()
    llama.train()
    one = perplexity(llama, tokenizer, TEXTS, seq_len=20, max_tokens=None, batch_size=1)
    many = perplexity(llama, tokenizer, TEXTS, seq_len=20, max_tokens=None, batch_size=5)
    assert llama.training
    llama.eval()
    assert one.tokens == many.tokens and one.nll == pytest.approx(many.nll, abs=1e-6)


def test_perplexity_errors(llama):
    with pytest.raises(CorpusError):
        perplexity(llama, char_tokenizer(False), ["a"], seq_len=8)
    with pytest.raises(OptionError, match="64 positions"):
        perplexity(llama, char_tokenizer(), TEXTS, seq_len=65)
    broken = tiny_model("llama")
    with torch.no_grad():
        broken.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="non-finite"):
        perplexity(broken, char_tokenizer(), TEXTS, seq_len=16, max_tokens=32)


EXAMPLES = [
    ("a gripping, funny and moving film .", "pos"),
    ("dull .", "neg"),
    ("the plot is a mess and the acting is worse", 0),
    ("one of the best of the year", 1),
    ("__label__neg tedious", "neg"),
    ("i loved every minute of it , and so will you", "positive"),
    ("a waste of two hours", "negative"),
]


def test_polarity_matches_unbatched_scoring(llama):
    tokenizer = char_tokenizer()
    result = polarity_accuracy(llama, tokenizer, EXAMPLES, batch_size=3)
    again = polarity_accuracy(llama, tokenizer, EXAMPLES, batch_size=5)
    assert result == again
    assert 0.0 <= result.accuracy <= 1.0
    assert result.examples == 7 and result.positive_share == pytest.approx(3 / 7)
    correct = answered_positive = 0
    for text, label in EXAMPLES:
        prompt = [1] + tokenizer(f"Review: {text}\nSentiment:", add_special_tokens=False)[
            "input_ids"
        ]
        scores = []
        for word in (" positive", " negative"):
            target = tokenizer(word, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = llama(torch.tensor([prompt + target])).logits[0].double()
            logprobs = F.log_softmax(logits, -1)
            scores.append(
                sum(logprobs[len(prompt) - 1 + k, t].item() for k, t in enumerate(target))
            )
        positive = scores[0] >= scores[1]
        answered_positive += positive
        correct += positive == (str(label) in ("pos", "positive", "1"))
    assert result.accuracy == correct / 7
    assert result.predicted_positive_share == answered_positive / 7


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "bert"])
def test_continuation_logprobs_match_one_sequence_at_a_time(family):
    model = tiny_model(family)  # right padding must not move any family's positions
    requests = [
        ([1, 5, 6, 7], [[8], [9], [10]]),  # single tokens: the context is run once
        ([1, 9], [[10, 11, 12], [13]]),  # mixed lengths: one sequence per continuation
        ([1, *range(20, 40)], [[41, 42]]),
    ]
    batched = continuation_logprobs(model, char_tokenizer(), requests, batch_size=3)
    for (context, choices), scores in zip(requests, batched, strict=True):
        for choice, score in zip(choices, scores, strict=True):
            with torch.no_grad():
                logits = model(torch.tensor([context + choice])).logits[0].double()
            logprobs = F.log_softmax(logits, -1)
            expected = sum(logprobs[len(context) - 1 + k, t].item() for k, t in enumerate(choice))
            assert score == pytest.approx(expected, abs=1e-4)
    single = continuation_logprobs(model, char_tokenizer(), requests, batch_size=1)
    for one, many in zip(single, batched, strict=True):
        assert one == pytest.approx(many, abs=1e-4)


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.integers(0, 5, size=40).astype(float)
        b = a + rng.integers(0, 4, size=40)
        assert spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b).statistic, abs=1e-12)
    assert math.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


@pytest.fixture(scope="module")
def bert() -> nn.Module:
    return tiny_model("bert")


def test_embeddings_ignore_padding_and_truncate(bert):
    tokenizer = char_tokenizer()
    docs = [TEXTS[0], "short", "x" * 200]  # the last is longer than the 64 positions
    batched = embed_documents(bert, tokenizer, docs, batch_size=3)
    single = torch.cat([embed_documents(bert, tokenizer, [d], batch_size=1) for d in docs])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    result = similarity_spearman(
        bert, tokenizer, docs, [(0, 1, 0.2), (0, 2, 0.9), (1, 2, 0.1)], batch_size=2
    )
    assert -1.0 <= result.spearman <= 1.0 and (result.pairs, result.documents) == (3, 3)


def test_is_causal_lm(llama, bert):
    assert is_causal_lm(llama) and is_causal_lm(tiny_model("gpt2"))
    assert not is_causal_lm(bert)


def _parts_bytes(model) -> int:
    total = 0
    for block in arch.get_ffn_blocks(model):
        parts = block.parts()
        tensors = (
            parts.up,
            parts.gate,
            parts.down,
            parts.up_bias,
            parts.gate_bias,
            parts.down_bias,
        )
        total += sum(t.nbytes for t in tensors if t is not None)
    return total


@pytest.mark.parametrize("family", FAMILIES)
def test_ffn_bytes_are_the_ffn_weights(family):
    model = tiny_model(family)
    assert ffn_bytes(model) == _parts_bytes(model)
    assert ffn_bytes(model) < total_bytes(model)


def _dense_split_ffn(block: arch.FFNBlock) -> SplitFFN:
    """A SplitFFN keeping every neuron heavy in fp16 (no light part)."""
    parts = block.parts()

    def half(t):
        return None if t is None else t.half()

    weights = SplitFFNWeights(
        activation=parts.activation,
        gated=parts.gated,
        heavy_up=half(parts.up),
        heavy_gate=half(parts.gate),
        heavy_down=half(parts.down),
        up_bias=half(parts.up_bias),
        gate_bias=half(parts.gate_bias),
        down_bias=half(parts.down_bias),
    )
    return SplitFFN(weights)


@pytest.mark.parametrize("family", ["llama", "bert", "opt"])
def test_ffn_bytes_count_split_ffns(family):
    model = tiny_model(family)
    dense_ffn, dense_total = ffn_bytes(model), total_bytes(model)
    blocks = arch.get_ffn_blocks(model)
    blocks[0].install(_dense_split_ffn(blocks[0]))
    with pytest.raises(UnsupportedModelError):  # partly compressed: refused, not miscounted
        ffn_bytes(model)
    for block in blocks[1:]:
        block.install(_dense_split_ffn(block))
    assert ffn_bytes(model) == dense_ffn // 2  # fp32 -> fp16, same tensors
    assert total_bytes(model) == dense_total - dense_ffn // 2
    assert ffn_bytes(model) == sum(m.nbytes() for _, _, m in arch.installed_ffns(model, SplitFFN))


def test_total_bytes_counts_tied_weights_once():
    model = tiny_model("gpt2")  # GPT-2 ties its LM head to the embedding
    assert model.lm_head.weight is model.transformer.wte.weight
    unique = {id(p): p for p in model.parameters()}.values()
    buffers = [b for name, b in model.named_buffers() if name in model.state_dict()]
    assert total_bytes(model) == sum(p.nbytes for p in unique) + sum(b.nbytes for b in buffers)


def _report(name: str, ppl: float, accuracy: float, ffn: int) -> EvalReport:
    return EvalReport(
        model=name,
        model_type="llama",
        dtype="float32",
        causal_lm=True,
        ffn_bytes=ffn,
        total_bytes=3 * ffn,
        perplexity={"wiki-eval": PerplexityResult(ppl, math.log(ppl), 100, 2)},
        polarity=PolarityResult(accuracy, 200, 0.5, 0.6),
        settings={"seq_len": 512, "max_tokens": 16384, "batch_size": 4, "device": "cpu"},
        timings_s={"perplexity wiki-eval": 1.5},
        wall_time_s=2.0,
    )


def test_report_json_round_trip(tmp_path):
    report = _report("dense", 21.0, 0.61, 1000)
    encoder = EvalReport(
        "minilm", "bert", "float32", False, 10, 20, similarity=SimilarityResult(0.5, 1225, 50)
    )
    for original in (report, encoder):
        original.save(tmp_path / "report.json")
        assert EvalReport.load(tmp_path / "report.json") == original
        assert EvalReport.from_dict(original.to_dict()) == original


def test_comparison_table_shows_deltas():
    reports = {"dense": _report("dense", 20.0, 0.6, 1000), "split": _report("s", 22.0, 0.7, 400)}
    console = Console(width=200, record=True)
    console.print(comparison_table(reports))
    text = console.export_text()
    assert "dense (ref)" in text and "Δ split" in text
    assert "+2.000 (+10.0%)" in text  # perplexity
    assert "-0.00 (-60.0%)" in text  # FFN MiB: 1000 -> 400 bytes
    assert "+0.100 (+16.7%)" in text  # polarity accuracy
    assert "not comparable" not in text
    reports["split"].settings["max_tokens"] = 4096
    console.print(comparison_table(reports))
    assert "not comparable: split" in console.export_text()


def test_evaluate_tiny_models_on_packaged_corpora(llama, bert, monkeypatch):
    from ffnsplit import data

    examples = data.polarity_examples()
    assert len(examples) == 200
    monkeypatch.setattr(data, "polarity_examples", lambda: examples[:20] + examples[-20:])
    tokenizer = char_tokenizer()
    started = time.perf_counter()
    seen = []
    report = evaluate(
        llama,
        tokenizer,
        name="tiny",
        seq_len=32,
        max_tokens=62,
        progress=lambda stage, done, total: seen.append(stage),
    )
    assert set(report.perplexity) == {"wiki-eval", "lee-news"}
    assert all(r.tokens == 62 and r.windows == 2 for r in report.perplexity.values())
    assert report.polarity.examples == 40 and 0.0 <= report.polarity.accuracy <= 1.0
    assert report.polarity.positive_share == 0.5
    assert report.similarity is None
    assert sorted(set(seen)) == ["perplexity lee-news", "perplexity wiki-eval", "polarity"]
    assert report.ffn_bytes == _parts_bytes(llama)
    assert 0 < report.wall_time_s <= time.perf_counter() - started
    encoder = evaluate(bert, tokenizer, name="tiny-bert", progress=lambda *args: seen.append(args))
    assert seen[-1] == ("similarity", 50, 50)
    assert not encoder.perplexity and encoder.polarity is None
    assert encoder.similarity.documents == 50 and encoder.similarity.pairs > 100
    assert EvalReport.from_dict(encoder.to_dict()) == encoder


@pytest.mark.slow
def test_smollm2_perplexity_on_wiki_eval(cache_dir):
    from ffnsplit.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    result = perplexity(model, tokenizer, "wiki-eval", max_tokens=4096)
    assert (result.tokens, result.windows) == (4096, 9)
    assert 5.0 < result.ppl < 60.0  # measured 22.05 (16384 tokens: 22.63)
    assert ffn_bytes(model) == 30 * 3 * 576 * 1536 * 4  # 30 SwiGLU FFNs, fp32, no biases


@pytest.mark.slow
def test_minilm_similarity_tracks_human_ratings(cache_dir):
    from ffnsplit.models import load_model

    model, tokenizer = load_model("minilm-l6")
    result = similarity_spearman(model, tokenizer)
    assert (result.documents, result.pairs) == (50, 1225)
    assert result.spearman > 0.3  # measured 0.508
    assert ffn_bytes(model) == 6 * (2 * 384 * 1536 + 1536 + 384) * 4
