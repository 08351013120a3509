"""Perplexity of a causal LM on a corpus, with one fixed, documented protocol.

Protocol (the same for every model, dense or compressed, so numbers are comparable):

1. The corpus's documents are taken in corpus order, each tokenized on its own without special
   tokens, and concatenated into one token stream with the tokens of ``"\\n\\n"`` between documents.
2. The stream is cut into non-overlapping windows, in order, from its start (no sampling, no
   seed). When the tokenizer has a BOS token, each window is ``[BOS]`` followed by the next
   ``seq_len - 1`` stream tokens, all of which are predicted (the BOS is context, never
   predicted). Without a BOS token, each window is the next ``seq_len`` stream tokens and its first
   token is context only. Either way a window of ``seq_len`` tokens predicts ``seq_len - 1`` tokens
   and no token is predicted twice.
3. Windows are taken until ``max_tokens`` tokens have been predicted (the last window is shortened
   to hit that number exactly) or the stream ends.
4. ``nll`` is the mean next-token negative log-likelihood (natural log, computed in float32 from
   the logits, summed in float64) over all predicted tokens of all windows, and
   ``ppl = exp(nll)``. Windows are independent: no state is carried from one to the next.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ffnsplit.errors import CorpusError, NumericalError, OptionError

if TYPE_CHECKING:
    from ffnsplit.data import Corpus

DOCUMENT_SEPARATOR = "\n\n"

Progress = Callable[[int, int], None]
"""Progress callback: called with (units done, units in total) after each batch."""


@dataclass
class PerplexityResult:
    """Perplexity of one model on one corpus under the module's protocol."""

    ppl: float
    nll: float  # mean next-token NLL (nats) over predicted tokens
    tokens: int  # predicted tokens
    windows: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PerplexityResult:
        return cls(**data)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def inference(model: nn.Module, device: str | torch.device | None) -> Iterator[torch.device]:
    """Run `model` in eval mode under inference_mode on `device` (moving it there when given);
    the model's train/eval mode is restored on the way out."""
    if device is not None:
        model.to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield model_device(model) if device is None else torch.device(device)
    finally:
        model.train(was_training)


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model was built for (None when its config does not say)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def corpus_texts(corpus: Corpus | str | Sequence[str]) -> tuple[str, list[str]]:
    """(name, documents) of a corpus given as a Corpus, a corpus name, or a list of documents."""
    if isinstance(corpus, str):
        from ffnsplit.data import load_corpus

        corpus = load_corpus(corpus)
    if hasattr(corpus, "texts"):
        return str(corpus.name), list(corpus.texts)
    return "texts", list(corpus)


def bos_id(tokenizer) -> int | None:
    """The tokenizer's BOS token id, or None when it has none."""
    return getattr(tokenizer, "bos_token_id", None)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def token_stream(tokenizer, texts: Sequence[str], min_tokens: int | None) -> list[int]:
    """Documents tokenized one by one and joined by the separator's tokens, in corpus order;
    tokenization stops once the stream holds `min_tokens` tokens (None: the whole corpus)."""
    separator = _encode(tokenizer, DOCUMENT_SEPARATOR)
    stream: list[int] = []
    for index, text in enumerate(texts):
        if min_tokens is not None and len(stream) >= min_tokens:
            break
        if index:
            stream.extend(separator)
        stream.extend(_encode(tokenizer, text))
    return stream


def make_windows(
    stream: Sequence[int], bos: int | None, seq_len: int, max_tokens: int | None
) -> list[list[int]]:
    """Cut a token stream into the protocol's windows (see the module docstring)."""
    if seq_len < 2:
        raise OptionError(f"seq_len must be at least 2 (got {seq_len}): use e.g. --seq-len 512")
    context = 0 if bos is not None else 1  # stream tokens each window uses as context only
    prefix = [bos] if bos is not None else []
    windows: list[list[int]] = []
    position = predicted = 0
    while max_tokens is None or predicted < max_tokens:
        n_predict = min(seq_len - 1, len(stream) - position - context)
        if max_tokens is not None:
            n_predict = min(n_predict, max_tokens - predicted)
        if n_predict < 1:
            break
        windows.append(prefix + list(stream[position : position + context + n_predict]))
        position += context + n_predict
        predicted += n_predict
    return windows


def stream_tokens_needed(has_bos: bool, seq_len: int, max_tokens: int | None) -> int | None:
    """Stream tokens the protocol consumes to predict `max_tokens` tokens (None: everything)."""
    if max_tokens is None:
        return None
    if has_bos:
        return max_tokens
    return max_tokens + math.ceil(max_tokens / (seq_len - 1))


def _batches(windows: list[list[int]], batch_size: int) -> Iterator[list[list[int]]]:
    """Consecutive windows of equal length, at most `batch_size` at a time (no padding needed)."""
    batch: list[list[int]] = []
    for window in windows:
        if batch and (len(batch) == batch_size or len(window) != len(batch[0])):
            yield batch
            batch = []
        batch.append(window)
    if batch:
        yield batch


def perplexity(
    model: nn.Module,
    tokenizer,
    corpus: Corpus | str | Sequence[str],
    seq_len: int = 512,
    max_tokens: int | None = 16384,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> PerplexityResult:
    """Perplexity of a causal LM on `corpus` (a Corpus, a corpus name or a list of documents).

    `max_tokens` caps the number of predicted tokens (None: the whole corpus); `progress` is called
    with (tokens done, tokens in total) after each batch.
    """
    if batch_size < 1:
        raise OptionError(f"batch_size must be at least 1 (got {batch_size})")
    if max_tokens is not None and max_tokens < 1:
        raise OptionError(f"max_tokens must be at least 1 (got {max_tokens})")
    limit = max_positions(model)
    if limit is not None and seq_len > limit:
        raise OptionError(
            f"seq_len {seq_len} is longer than the model's {limit} positions: use --seq-len {limit}"
        )
    name, texts = corpus_texts(corpus)
    bos = bos_id(tokenizer)
    needed = stream_tokens_needed(bos is not None, seq_len, max_tokens)
    windows = make_windows(token_stream(tokenizer, texts, needed), bos, seq_len, max_tokens)
    if not windows:
        raise CorpusError(
            f"corpus {name!r} has too few tokens to evaluate perplexity: give a longer text"
        )
    total = sum(len(window) - 1 for window in windows)
    nll_sum = 0.0
    done = first_window = 0
    with inference(model, device) as run_device:
        for batch in _batches(windows, batch_size):
            input_ids = torch.tensor(batch, dtype=torch.long, device=run_device)
            logits = model(input_ids=input_ids, use_cache=False).logits
            for row in range(len(batch)):
                losses = F.cross_entropy(
                    logits[row, :-1].float(), input_ids[row, 1:], reduction="none"
                )
                if not torch.isfinite(losses).all():
                    raise NumericalError(
                        f"perplexity on {name!r}: the model gives a non-finite loss in window "
                        f"{first_window + row} (NaN/Inf logits): its weights or "
                        "activations overflow; evaluate in float32 or check the checkpoint"
                    )
                nll_sum += losses.sum(dtype=torch.float64).item()
            done += sum(len(window) - 1 for window in batch)
            first_window += len(batch)
            if progress is not None:
                progress(done, total)
    nll = nll_sum / total
    ppl = math.exp(nll) if nll < math.log(torch.finfo(torch.float64).max) else math.inf
    return PerplexityResult(ppl=ppl, nll=nll, tokens=total, windows=len(windows))
