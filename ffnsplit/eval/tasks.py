"""Downstream quality checks beside perplexity: zero-shot polarity (causal LMs) and document
similarity against human ratings (encoders).

Polarity: each labelled sentence is put in `POLARITY_TEMPLATE`; the model's summed log-probability
of the label words (" positive" / " negative") after the prompt decides its answer (a tie answers
"positive"). Prompt and label are tokenized apart (no special tokens) and joined, after the BOS token
when the tokenizer has one. The share of positive labels and of positive answers is reported too,
so the accuracy of a model that always gives one answer can be read.

Similarity: each document's embedding is the attention-masked mean of the encoder's last hidden
states (documents truncated to the model's maximum length); the cosine similarity of each
human-rated pair is compared with the human score by Spearman's rank correlation.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import nn

from ffnsplit.errors import CorpusError, OptionError
from ffnsplit.eval.perplexity import Progress, bos_id, inference, max_positions

POLARITY_TEMPLATE = "Review: {text}\nSentiment:"
POLARITY_LABELS = (" positive", " negative")
_POSITIVE = {"1", "pos", "positive", "true"}
_NEGATIVE = {"0", "neg", "negative", "false"}


@dataclass
class PolarityResult:
    """Zero-shot polarity accuracy and the label balance needed to read it."""

    accuracy: float
    examples: int
    positive_share: float  # share of examples labelled positive (accuracy of "always positive")
    predicted_positive_share: float  # share of examples the model called positive

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PolarityResult:
        return cls(**data)


@dataclass
class SimilarityResult:
    """Spearman correlation between embedding cosine similarity and human similarity ratings."""

    spearman: float
    pairs: int
    documents: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SimilarityResult:
        return cls(**data)


def _causal_lm_class_names() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return names


def is_causal_lm(model: nn.Module) -> bool:
    """True for a model that predicts the next token (a transformers *ForCausalLM / LM-head model)."""
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name in _causal_lm_class_names()


def _is_positive(label: object) -> bool:
    text = str(label).strip().lower().removeprefix("__label__")
    if text in _POSITIVE:
        return True
    if text in _NEGATIVE:
        return False
    raise CorpusError(f"unknown polarity label {label!r}: use positive/negative, pos/neg or 1/0")


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


@dataclass(frozen=True)
class _Scored:
    """One sequence to run and, for each continuation it scores, (request, choice, start, ids):
    the continuation's tokens `ids` are predicted from positions start .. start + len(ids) - 1."""

    tokens: list[int]
    targets: list[tuple[int, int, int, list[int]]]


def _sequences(requests: Sequence[tuple[list[int], Sequence[list[int]]]]) -> list[_Scored]:
    sequences = []
    for index, (context, choices) in enumerate(requests):
        if not context or any(not choice for choice in choices):
            raise OptionError("a scored context or continuation is empty: check the template")
        start = len(context) - 1
        if all(len(choice) == 1 for choice in choices):  # one pass over the context scores all
            targets = [(index, k, start, choice) for k, choice in enumerate(choices)]
            sequences.append(_Scored(list(context), targets))
        else:
            sequences += [
                _Scored(list(context) + list(choice), [(index, k, start, choice)])
                for k, choice in enumerate(choices)
            ]
    return sequences


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def continuation_logprobs(
    model: nn.Module,
    tokenizer,
    requests: Sequence[tuple[list[int], Sequence[list[int]]]],
    batch_size: int = 16,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> list[list[float]]:
    """For each (context ids, [continuation ids, ...]): sum of log p(continuation | context).

    Sequences are right-padded in batches (sorted by length to waste little compute): with causal
    attention the padding comes after every scored position, so positions and results are those of
    each sequence alone. When every continuation of a request is one token, the context is run once
    for all of them; only the scored positions go through the LM head when the model allows it.
    """
    if batch_size < 1:
        raise OptionError(f"batch_size must be at least 1 (got {batch_size})")
    scores = [[0.0] * len(choices) for _, choices in requests]
    sequences = sorted(_sequences(requests), key=lambda item: len(item.tokens))
    pad = _pad_id(tokenizer)
    keep_logits = _accepts_logits_to_keep(model)
    with inference(model, device) as run_device:
        for first in range(0, len(sequences), batch_size):
            batch = sequences[first : first + batch_size]
            width = max(len(item.tokens) for item in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, item in enumerate(batch):
                input_ids[row, : len(item.tokens)] = torch.tensor(item.tokens)
                attention_mask[row, : len(item.tokens)] = 1
            needed = sorted(
                {s + k for item in batch for _, _, s, ids in item.targets for k in range(len(ids))}
            )
            extra = (
                {"logits_to_keep": torch.tensor(needed, device=run_device)} if keep_logits else {}
            )
            logits = model(
                input_ids=input_ids.to(run_device),
                attention_mask=attention_mask.to(run_device),
                use_cache=False,
                **extra,
            ).logits
            column = {p: (i if keep_logits else p) for i, p in enumerate(needed)}
            for row, item in enumerate(batch):
                for index, choice, start, ids in item.targets:
                    columns = [column[start + k] for k in range(len(ids))]
                    logprobs = F.log_softmax(logits[row, columns].float(), dim=-1)
                    targets = torch.tensor(ids, device=logprobs.device)
                    total = logprobs.gather(1, targets[:, None]).sum(dtype=torch.float64)
                    scores[index][choice] = total.item()
            if progress is not None:
                progress(first + len(batch), len(sequences))
    return scores


def polarity_accuracy(
    model: nn.Module,
    tokenizer,
    examples: Sequence[tuple[str, object]] | None = None,
    template: str = POLARITY_TEMPLATE,
    labels: tuple[str, str] = POLARITY_LABELS,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> PolarityResult:
    """Zero-shot accuracy of a causal LM on labelled sentences (default: the `polarity` corpus).

    Labels may be positive/negative, pos/neg (fastText `__label__` prefix allowed) or 1/0.
    """
    if examples is None:
        from ffnsplit.data import polarity_examples

        examples = polarity_examples()
    if not examples:
        raise CorpusError("no polarity examples to score: give at least one labelled sentence")
    if "{text}" not in template:
        raise OptionError(f"the polarity template must contain {{text}} (got {template!r})")
    bos = bos_id(tokenizer)
    prefix = [bos] if bos is not None else []
    label_ids = [_encode(tokenizer, label) for label in labels]
    if any(not ids for ids in label_ids):
        raise OptionError(f"a polarity label tokenizes to nothing: {labels!r}")
    truth = [_is_positive(label) for _, label in examples]
    requests = [
        (prefix + _encode(tokenizer, template.format(text=text)), label_ids) for text, _ in examples
    ]
    scores = continuation_logprobs(model, tokenizer, requests, batch_size, device, progress)
    predicted = [positive >= negative for positive, negative in scores]
    n = len(examples)
    return PolarityResult(
        accuracy=sum(p == t for p, t in zip(predicted, truth, strict=True)) / n,
        examples=n,
        positive_share=sum(truth) / n,
        predicted_positive_share=sum(predicted) / n,
    )


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (ties get their average rank); NaN if either side is constant."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise OptionError(
            f"spearman needs two 1-D sequences of equal length >= 2 ({a.shape}, {b.shape})"
        )
    rank_a = rankdata(a, method="average") - (len(a) + 1) / 2
    rank_b = rankdata(b, method="average") - (len(b) + 1) / 2
    denominator = np.sqrt((rank_a**2).sum() * (rank_b**2).sum())
    if denominator == 0:
        return float("nan")
    return float((rank_a * rank_b).sum() / denominator)


def _max_length(model: nn.Module, tokenizer) -> int:
    limits = [max_positions(model), tokenizer.model_max_length]
    return min(int(limit) for limit in limits if limit is not None and limit > 0)


def embed_documents(
    model: nn.Module,
    tokenizer,
    documents: Sequence[str],
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Attention-masked mean of the last hidden states per document: float32 [n_docs, hidden]."""
    if batch_size < 1:
        raise OptionError(f"batch_size must be at least 1 (got {batch_size})")
    max_length = _max_length(model, tokenizer)
    embeddings = []
    with inference(model, device) as run_device:
        for start in range(0, len(documents), batch_size):
            batch = tokenizer(
                list(documents[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(run_device)
            output = model(**batch, output_hidden_states=True)
            hidden = output.hidden_states[-1].float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            embeddings.append(((hidden * mask).sum(1) / mask.sum(1).clamp_min(1)).cpu())
            if progress is not None:
                progress(min(start + batch_size, len(documents)), len(documents))
    return torch.cat(embeddings)


def similarity_spearman(
    model: nn.Module,
    tokenizer,
    documents: Sequence[str] | None = None,
    pairs: Sequence[tuple[int, int, float]] | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> SimilarityResult:
    """Spearman correlation of embedding cosine similarity with human ratings (default: Lee)."""
    if documents is None or pairs is None:
        from ffnsplit.data import lee_similarity

        documents, pairs = lee_similarity()
    if len(pairs) < 2:
        raise CorpusError("similarity needs at least two rated document pairs")
    embeddings = embed_documents(model, tokenizer, documents, batch_size, device, progress)
    embeddings = F.normalize(embeddings, dim=-1)
    first = torch.tensor([i for i, _, _ in pairs])
    second = torch.tensor([j for _, j, _ in pairs])
    cosines = (embeddings[first] * embeddings[second]).sum(-1).double()
    return SimilarityResult(
        spearman=spearman(cosines.tolist(), [score for _, _, score in pairs]),
        pairs=len(pairs),
        documents=len(documents),
    )
