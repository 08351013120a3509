"""Greedy text generation with a causal LM, compressed or not (`ffnsplit generate`, api.generate).

Two decoders, the same tokens:
- "static": eval/bench.StaticDecoder, the end-to-end bench's decoder (a static KV cache, ffnsplit's
  decode kernels on CUDA, each decode step one CUDA-graph replay that also writes the new token
  into a device buffer; the host reads the buffer every CHECK_EVERY steps to look for a stop
  token). Llama-style models (bench.DECODER_TYPES).
- "hf": the model's own `generate` (greedy), for every other causal LM (Gemma 3, ...); a split FFN
  still runs through ffnsplit's kernels (eager calls, graphs.py on CUDA).

Greedy only: the point is to see what a compressed model says next to its original, and how
fast, token for token. Timings are of this run: on CUDA after a warm-up (kernels compile and
autotune for the prompt's length first), on the CPU as they come.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ffnsplit.errors import OptionError, UnsupportedModelError

DECODERS = ("auto", "static", "hf")
CHECK_EVERY = 16  # decode steps between the host's looks at the new tokens (a sync each)
# capture_graph runs a step three times before it records one: the cache needs those positions
_CAPTURE_STEPS = 3


@dataclass
class Completion:
    """One prompt's greedy continuation. `tokens` are the new token ids, a stop token last when
    `stop` is "eos"; `text` is their decoding without special tokens; `prompt_ids` the prompt's
    ids as the model saw them (template included). prefill_ms: the prompt's
    forward and the first token (static decoder only); decode_tokens_per_s: decode steps run /
    their wall time (static: steps after the first token, the few past a stop token included;
    hf: all new tokens over the whole call, prefill included)."""

    prompt: str
    text: str
    prompt_tokens: int
    tokens: list[int]
    stop: str  # "eos" or "length"
    decoder: str  # "static" or "hf"
    timing: str  # "cuda-graph", "eager", "eager-cpu" or "hf-generate"
    prefill_ms: float | None
    decode_tokens_per_s: float | None
    prompt_ids: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


def stop_tokens(model: nn.Module, tokenizer) -> set[int]:
    """The ids that end a completion: the tokenizer's EOS and the generation config's."""
    stops: set[int] = set()
    for value in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(value, int):
            stops.add(value)
        elif isinstance(value, (list, tuple)):
            stops.update(int(v) for v in value)
    return stops


def prompt_ids(tokenizer, prompt: str, chat: bool | None, device: torch.device) -> Tensor:
    """[1, T] ids of `prompt`: through the tokenizer's chat template as one user message when
    `chat` is True (None: when the tokenizer has a template), else as plain text."""
    template = getattr(tokenizer, "chat_template", None)
    if chat and not template:
        raise OptionError("--chat: this tokenizer has no chat template; drop --chat")
    if chat or (chat is None and template):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise OptionError("a prompt gives no tokens: give some text")
    return ids.to(device)


def pick_decoder(model: nn.Module, decoder: str) -> str:
    from ffnsplit.eval.bench import DECODER_TYPES

    if decoder not in DECODERS:
        raise OptionError(f"unknown decoder {decoder!r}: choose one of {', '.join(DECODERS)}")
    supported = getattr(model.config, "model_type", None) in DECODER_TYPES
    if decoder == "static" and not supported:
        raise UnsupportedModelError(
            f"the static decoder runs Llama-style models ({', '.join(DECODER_TYPES)}); this one "
            f"is {model.config.model_type!r}: use --decoder hf (or auto)"
        )
    if decoder == "auto":
        return "static" if supported else "hf"
    return decoder


def _check_length(model: nn.Module, prompt_len: int, max_new_tokens: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and prompt_len + max_new_tokens > limit:
        raise OptionError(
            f"the prompt's {prompt_len} tokens and --max-new-tokens {max_new_tokens} pass the "
            f"model's {limit} positions: shorten the prompt or ask for fewer tokens"
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _until_stop(tokens: list[int], stops: set[int]) -> tuple[list[int], str]:
    for index, token in enumerate(tokens):
        if token in stops:
            return tokens[: index + 1], "eos"
    return tokens, "length"


def generate_static(
    model: nn.Module,
    ids: Tensor,
    max_new_tokens: int,
    stops: set[int],
    *,
    kernels: str = "auto",
    graphs: bool = True,
) -> tuple[list[int], str, str, float, float | None]:
    """(new tokens, stop, timing, prefill ms, decode tokens/s) of a greedy continuation of ids
    [1, T] through StaticDecoder."""
    from ffnsplit.eval.bench import StaticDecoder
    from ffnsplit.kernels.tiles import capture_graph

    device = ids.device
    cuda = device.type == "cuda"
    prompt_len = ids.shape[1]
    max_len = -(-(prompt_len + max_new_tokens + _CAPTURE_STEPS) // 64) * 64
    decoder = StaticDecoder(model, 1, max_len, kernels=kernels)
    positions = decoder.key_positions[:prompt_len]
    sequence = torch.zeros(1, max_len, dtype=torch.long, device=device)
    if cuda:  # compiles and tunes the kernels for this prompt length outside the timing
        decoder.forward(ids, positions)
    _sync(device)
    start = time.perf_counter()
    first = decoder.forward(ids, positions)[:, -1].argmax(dim=-1, keepdim=True)
    tokens = [int(first)]  # (a sync)
    prefill_ms = (time.perf_counter() - start) * 1e3
    timing = "eager" if cuda else "eager-cpu"
    if tokens[0] in stops or max_new_tokens == 1:
        return *_until_stop(tokens, stops), timing, prefill_ms, None

    def step() -> None:  # the next token, written at its position into `sequence`
        decoder.decode_step()
        sequence.index_copy_(1, decoder.position, decoder.tokens)

    decoder.start_decode(first, prompt_len)
    run = step
    graph = None
    if cuda and graphs:
        try:
            graph = capture_graph(step)
        except RuntimeError:  # a step that cannot be captured still runs, eagerly
            pass
        else:
            run, timing = graph.replay, "cuda-graph"
    if cuda and graph is None:
        step()  # warm-up (compiles)
    decoder.start_decode(first, prompt_len)  # the capture or warm-up ran the step: start again
    steps = 0
    _sync(device)
    start = time.perf_counter()
    while steps < max_new_tokens - 1 and not stops.intersection(tokens):
        count = min(CHECK_EVERY, max_new_tokens - 1 - steps)
        for _ in range(count):
            run()
        lo = prompt_len + 1 + steps  # the first token of these steps is at position T + 1
        tokens += sequence[0, lo : lo + count].tolist()
        steps += count
    seconds = time.perf_counter() - start
    return *_until_stop(tokens, stops), timing, prefill_ms, steps / seconds


def generate_hf(
    model: nn.Module, ids: Tensor, max_new_tokens: int, stops: set[int], pad: int | None
) -> tuple[list[int], str, float]:
    """(new tokens, stop, tokens/s over the whole call) of the model's own greedy generate."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=sorted(stops) or None,
        pad_token_id=pad if pad is not None else (min(stops) if stops else 0),
    )
    _sync(ids.device)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    _sync(ids.device)
    seconds = time.perf_counter() - start
    tokens, stop = _until_stop(out[0, ids.shape[1] :].tolist(), stops)
    return tokens, stop, len(tokens) / seconds


def generate(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    decoder: str = "auto",
    chat: bool | None = None,
    kernels: str = "auto",
) -> list[Completion]:
    """Greedy continuations of `prompts`, one at a time (batch 1), on the model's device."""
    if max_new_tokens < 1:
        raise OptionError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    if not prompts:
        raise OptionError("give a prompt: --prompt TEXT (repeatable)")
    can_generate = getattr(model, "can_generate", None)
    if getattr(model, "lm_head", None) is None and not (can_generate and can_generate()):
        raise UnsupportedModelError(
            f"this model ({getattr(model.config, 'model_type', type(model).__name__)}) has no "
            "language-model head: generate needs a causal LM"
        )
    name = pick_decoder(model, decoder)
    device = next(model.parameters()).device
    stops = stop_tokens(model, tokenizer)
    pad = getattr(tokenizer, "pad_token_id", None)
    encoded = [prompt_ids(tokenizer, prompt, chat, device) for prompt in prompts]
    for ids in encoded:  # every prompt checked before the first is run
        _check_length(model, ids.shape[1], max_new_tokens)
    completions = []
    with torch.no_grad():
        for prompt, ids in zip(prompts, encoded, strict=True):
            if name == "static":
                tokens, stop, timing, prefill_ms, rate = generate_static(
                    model, ids, max_new_tokens, stops, kernels=kernels
                )
            else:
                tokens, stop, rate = generate_hf(model, ids, max_new_tokens, stops, pad)
                timing, prefill_ms = "hf-generate", None
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            completions.append(
                Completion(
                    prompt,
                    text,
                    ids.shape[1],
                    tokens,
                    stop,
                    name,
                    timing,
                    prefill_ms,
                    rate,
                    ids[0].tolist(),
                )  # fmt: skip
            )
    return completions


def agreement(a: list[int], b: list[int]) -> int:
    """Leading tokens two completions share."""
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count
