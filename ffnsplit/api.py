"""The Python API behind every CLI command: one call per command, no logic only the CLI has."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ffnsplit.runtime import DTYPES as RUNTIME_DTYPES
from ffnsplit.runtime import dtype_name


def open_model(
    spec: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, object]:
    """Load any model ffnsplit accepts: packaged name, HF folder, hub id, or a compressed folder."""
    from ffnsplit import io, models

    path = Path(str(spec)).expanduser()
    if path.is_dir() and io.is_compressed_dir(path):
        return io.load_compressed(path, device=device, dtype=dtype)
    return models.load_model(spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


@dataclass
class LayerInfo:
    layer: int
    name: str
    kind: str  # "dense" or "split"
    hidden_size: int
    intermediate_size: int
    gated: bool
    activation: str
    dtype: str
    parameters: int  # FFN weights + biases; a split FFN: those its heavy + light neurons stand for
    nbytes: int


@dataclass
class ModelInfo:
    model_type: str
    layers: list[LayerInfo]
    total_parameters: int
    total_bytes: int

    @property
    def ffn_parameters(self) -> int:
        return sum(layer.parameters for layer in self.layers)

    @property
    def ffn_bytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)


def _tensor_bytes(module: nn.Module) -> tuple[int, int]:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)


def _split_parameters(module) -> int:
    """The dense weights and biases a split FFN stands for: up (and gate) rows and down columns of
    its heavy and light neurons, however they are stored (packed words, scales, low-rank factors
    and padding are storage, not parameters; pruned neurons are gone)."""
    neurons = module.n_heavy + module.n_light
    count = neurons * module.hidden_size * (3 if module.gated else 2)
    names = [name for name, _ in module.named_buffers()] + [n for n, _ in module.named_parameters()]
    count += neurons * any(name.endswith("up_bias") for name in names)
    count += neurons * any(name.endswith("gate_bias") for name in names)
    return count + module.hidden_size * any(name.endswith("down_bias") for name in names)


def _split_label(module) -> str:
    label = f"{module.n_heavy} heavy {dtype_name(module._dtype())}"
    if module.light_kind == "quant":
        light = module.light_up.weight()
        sym = "-sym" if light.symmetric else ""
        label += f" + {module.n_light} int{light.bits}-g{light.group_size}{sym}"
    elif module.light_kind == "lowrank":
        label += f" + {module.n_light} lowrank-r{module.lowrank_down.factors().rank}"
    return label


def model_info(model: nn.Module) -> ModelInfo:
    """Per-FFN shapes, activation, dtype and sizes, and the model's totals."""
    from ffnsplit.arch import get_ffn_blocks, installed_ffns
    from ffnsplit.modules import SplitFFN

    layers = []
    split = installed_ffns(model, SplitFFN)
    stored = 0  # elements the split FFNs store, replaced in the total by what they stand for
    for index, name, module in split:
        count, nbytes = _tensor_bytes(module)
        stored += count
        count = _split_parameters(module)
        layers.append(
            LayerInfo(
                layer=index,
                name=name,
                kind="split",
                hidden_size=module.hidden_size,
                intermediate_size=module.n_heavy + module.n_light,
                gated=module.gated,
                activation=module.activation,
                dtype=_split_label(module),
                parameters=count,
                nbytes=nbytes,
            )
        )
    for block in [] if split else get_ffn_blocks(model):
        parts = block.parts()
        tensors = [
            parts.up,
            parts.gate,
            parts.down,
            parts.up_bias,
            parts.gate_bias,
            parts.down_bias,
        ]
        tensors = [t for t in tensors if t is not None]
        layers.append(
            LayerInfo(
                layer=block.layer,
                name=block.name,
                kind="dense",
                hidden_size=parts.hidden_size,
                intermediate_size=parts.intermediate_size,
                gated=parts.gated,
                activation=parts.activation,
                dtype=dtype_name(parts.down.dtype),
                parameters=sum(t.numel() for t in tensors),
                nbytes=sum(t.numel() * t.element_size() for t in tensors),
            )
        )
    seen: set[int] = set()
    total_count = total_bytes = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() in seen and tensor.numel():  # tied weights count once
            continue
        seen.add(tensor.data_ptr())
        total_count += tensor.numel()
        total_bytes += tensor.numel() * tensor.element_size()
    if split:
        total_count += sum(layer.parameters for layer in layers) - stored
    return ModelInfo(
        model_type=getattr(model.config, "model_type", type(model).__name__),
        layers=layers,
        total_parameters=total_count,
        total_bytes=total_bytes,
    )


def profile(
    model_spec: str | os.PathLike,
    *,
    corpus: str = "wiki-calib",
    tokens: int = 32768,
    seq_len: int = 512,
    batch_size: int = 8,
    topk_fraction: float = 0.05,
    device: str = "auto",
    dtype: str | None = None,
    sequential: bool | None = None,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    plot: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
    progress=None,
):
    """Load a model, profile its FFN neurons on a corpus, optionally save the profile and a plot."""
    from ffnsplit import data
    from ffnsplit.errors import OptionError
    from ffnsplit.plotting import plot_profile
    from ffnsplit.profile import profile_model
    from ffnsplit.runtime import resolve_device, resolve_dtype

    for name, value, least in (("tokens", tokens, 1), ("seq-len", seq_len, 2),
                               ("batch-size", batch_size, 1)):  # fmt: skip
        if value < least:
            raise OptionError(f"--{name} must be at least {least} (got {value})")
    run_device = resolve_device(device)
    compute_dtype = resolve_dtype(dtype)
    # Loaded on the CPU: profile_model moves it to the device whole, or layer by layer when it
    # does not fit (sequential None = automatic) or when asked to.
    load_device = run_device if sequential is False else "cpu"
    model, tokenizer = open_model(
        model_spec, device=load_device, dtype=compute_dtype, trust_remote_code=trust_remote_code
    )
    _check_seq_len(model, seq_len)
    text = data.load_corpus(corpus)
    input_ids = data.token_blocks(tokenizer, text, tokens, seq_len, seed=seed)
    result = profile_model(
        model,
        input_ids,
        topk_fraction=topk_fraction,
        batch_size=batch_size,
        device=run_device,
        sequential=sequential,
        progress=progress,
        corpus_meta={"name": text.name, "checksum": text.checksum, "seed": seed},
    )
    result.meta["model_name"] = str(model_spec)
    if out is not None:
        result.save(out)
    if plot is not None:
        plot_profile(result, plot)
    return result


def _check_seq_len(model: nn.Module, seq_len: int) -> None:
    """Calibration blocks no longer than a learned position table (BERT-style encoders): a
    one-line error, not a shape error deep inside the forward pass. Rotary models run past
    their configured length, so they are not held to it."""
    from ffnsplit.errors import OptionError
    from ffnsplit.eval.perplexity import max_positions

    learned = any(
        name.endswith("position_embeddings") and isinstance(module, nn.Embedding)
        for name, module in model.named_modules()
    )
    limit = max_positions(model)
    if learned and limit is not None and seq_len > limit:
        raise OptionError(
            f"--seq-len {seq_len} is longer than the model's {limit} positions: use --seq-len "
            f"{limit} or less"
        )


SELECTIONS = {
    "ffsplit": "output_norm",
    "uniform": "none",
    "random": "random",
    "weight-norm": "weight_norm",
}
"""--baseline name -> plan selection: FFSplit's output-norm heavy set, or one of the baselines."""


@dataclass
class CompressOptions:
    """Everything `ffnsplit compress` decides, JSON-able (kept in the checkpoint)."""

    light: str = "int4-g128"
    heavy_fraction: float | None = None
    heavy_share: float | None = None
    target_bits: float | None = None
    target_size: float | None = None
    prune_fraction: float = 0.0
    heavy_dtype: str = "float16"
    baseline: str = "ffsplit"
    calib_corpus: str = "wiki-calib"
    calib_tokens: int = 8192
    seq_len: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        from ffnsplit.errors import OptionError

        if self.baseline not in SELECTIONS:
            raise OptionError(
                f"unknown baseline {self.baseline!r}: choose one of {', '.join(SELECTIONS)}"
            )
        budgets = [self.target_bits, self.target_size]
        heavies = [self.heavy_fraction, self.heavy_share]
        if all(b is not None for b in budgets) or all(h is not None for h in heavies):
            raise OptionError(
                "give one of --target-bits / --target-size, and one of --heavy-fraction / "
                "--heavy-share"
            )
        if any(b is not None for b in budgets) and any(h is not None for h in heavies):
            raise OptionError(
                "a budget (--target-bits / --target-size) chooses the heavy fraction per layer: "
                "drop --heavy-fraction / --heavy-share"
            )
        for name in ("heavy_fraction", "heavy_share", "target_size"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise OptionError(f"--{name.replace('_', '-')} {value} is outside [0, 1]")
        if not 0.0 <= self.prune_fraction < 1.0:
            raise OptionError(f"--prune-fraction {self.prune_fraction} is outside [0, 1)")
        if self.target_bits is not None and not 0.0 < self.target_bits <= 16.0:
            raise OptionError(f"--target-bits {self.target_bits} is outside (0, 16]")
        if self.calib_tokens <= 0 or self.seq_len <= 1:
            raise OptionError("--calib-tokens and --seq-len (> 1) must be positive")
        if self.heavy_dtype not in ("float16", "bfloat16"):
            raise OptionError(
                f"unknown --heavy-dtype {self.heavy_dtype!r}: use float16 or bfloat16"
            )

    @property
    def selection(self) -> str:
        return SELECTIONS[self.baseline]

    @property
    def budget_mode(self) -> bool:
        return self.target_bits is not None or self.target_size is not None


def make_split_plan(
    model: nn.Module, profile_obj, options: CompressOptions, calib_ids=None, progress=None
):
    """The SplitPlan `options` ask for on `model` (fixed format, or a budget).

    Budget mode measures each neuron's error in every candidate format on `calib_ids`.
    """
    from ffnsplit import apply, plan

    profile_obj.check_model(model)
    geometry = apply.ffn_geometry(model)
    weight_norms = apply.weight_norm_scores(model) if options.selection == "weight_norm" else None
    common = {
        "geometry": geometry,
        "selection": options.selection,
        "weight_norms": weight_norms,
        "seed": options.seed,
        "heavy_dtype": options.heavy_dtype,
    }
    if options.budget_mode:
        errors = apply.measure_errors(model, calib_ids, progress=progress)
        return plan.plan_for_budget(
            profile_obj,
            target_bits=options.target_bits,
            target_size=options.target_size,
            neuron_errors=errors,
            **common,
        )
    heavy_fraction = options.heavy_fraction
    if heavy_fraction is None and options.heavy_share is None:
        heavy_fraction = 0.0 if options.selection == "none" else 0.05
    return plan.make_plan(
        profile_obj,
        light=plan.parse_light_format(options.light),
        heavy_fraction=heavy_fraction,
        heavy_share=options.heavy_share,
        prune_fraction=options.prune_fraction,
        **common,
    )


def compress(
    model_spec: str | os.PathLike,
    profile_path: str | os.PathLike,
    out: str | os.PathLike,
    options: CompressOptions | None = None,
    *,
    device: str = "auto",
    overwrite: bool = False,
    trust_remote_code: bool = False,
    progress=None,
) -> dict:
    """Profile file + options -> plan -> compressed model saved to `out`; returns its size report."""
    from ffnsplit import apply, data, io
    from ffnsplit.fsutil import refuse_existing
    from ffnsplit.profile import Profile
    from ffnsplit.runtime import resolve_device

    options = options or CompressOptions()
    out = Path(out)
    refuse_existing(out, overwrite)  # before the work; save_compressed checks again
    run_device = resolve_device(device)
    profile_obj = Profile.load(profile_path)
    model, tokenizer = open_model(model_spec, trust_remote_code=trust_remote_code)
    corpus = data.load_corpus(options.calib_corpus)

    def calibration():
        _check_seq_len(model, options.seq_len)
        return data.token_blocks(
            tokenizer, corpus, options.calib_tokens, options.seq_len, seed=options.seed
        )

    calib_ids = calibration() if options.budget_mode else None
    split_plan = make_split_plan(model, profile_obj, options, calib_ids, progress=progress)
    if calib_ids is None and any(apply.needs_calibration(lp.light) for lp in split_plan.layers):
        calib_ids = calibration()
    apply.compress_model(
        model, split_plan, calib_ids=calib_ids, device=run_device, progress=progress
    )
    # The rest of the model is stored in the heavy dtype too (packed weights are unaffected).
    model.to(RUNTIME_DTYPES[options.heavy_dtype])
    extra = {"options": asdict(options), "source_model": str(model_spec)}
    io.save_compressed(model, tokenizer, split_plan, out, overwrite=overwrite, extra=extra)
    return io.size_report(model, split_plan)


def evaluate(
    model_specs: list[str],
    *,
    corpora: tuple[str, ...] = ("wiki-eval", "lee-news"),
    seq_len: int = 512,
    max_tokens: int | None = 16384,
    batch_size: int = 4,
    device: str = "auto",
    dtype: str | None = None,
    json_path: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
    progress=None,
    light_act: str | Sequence[str] = "none",
) -> dict:
    """Evaluate each model (one at a time, freed after) with one protocol; name -> EvalReport.

    Sizes count floating-point tensors at 16 bits (as deployed on a GPU), whatever dtype the
    model runs in here, so a dense original and its compressed version compare fairly.
    `light_act` (one for all models, or one per model): "int8" runs a compressed model's light
    part on int8 activations (`modules.set_light_act`); its report is named "SPEC (int8 light
    act.)", so a checkpoint can stand beside itself.
    """
    import gc
    import json

    from ffnsplit.data import load_corpus
    from ffnsplit.errors import OptionError
    from ffnsplit.eval.compare import evaluate as evaluate_model
    from ffnsplit.fsutil import atomic_write_text
    from ffnsplit.io import is_compressed_dir
    from ffnsplit.modules import LIGHT_ACTS, set_light_act
    from ffnsplit.runtime import resolve_device, resolve_dtype

    acts = [light_act] * len(model_specs) if isinstance(light_act, str) else list(light_act)
    if len(acts) != len(model_specs):
        raise OptionError(f"{len(acts)} light activation modes for {len(model_specs)} models")
    for spec, act in zip(model_specs, acts, strict=True):  # before any model is evaluated
        if act not in LIGHT_ACTS:
            raise OptionError(f"--light-act {act!r}: choose one of {', '.join(LIGHT_ACTS)}")
        path = Path(str(spec)).expanduser()
        if act != "none" and not (path.is_dir() and is_compressed_dir(path)):
            raise OptionError(
                f"--light-act {act} applies to a compressed model's folder; {spec} is not one"
            )
    if seq_len < 2:
        raise OptionError(f"--seq-len must be at least 2 (got {seq_len})")
    if max_tokens is not None and max_tokens < 1:
        raise OptionError(f"--max-tokens must be at least 1 (got {max_tokens})")
    if batch_size < 1:
        raise OptionError(f"--batch-size must be at least 1 (got {batch_size})")
    for corpus in corpora:  # every name found before the first model is evaluated
        load_corpus(corpus)
    run_device = resolve_device(device)
    compute_dtype = resolve_dtype(dtype)
    if compute_dtype is None and run_device.type == "cpu":
        compute_dtype = torch.float32  # fp16 checkpoints run in fp32 on the CPU
    _same_kind(model_specs)
    reports = {}
    for spec, act in zip(model_specs, acts, strict=True):
        model, tokenizer = open_model(
            spec, device=run_device, dtype=compute_dtype, trust_remote_code=trust_remote_code
        )
        name = str(spec)
        if act != "none":
            set_light_act(model, act)
            name = f"{spec} ({act} light act.)"
        reports[name] = evaluate_model(
            model,
            tokenizer,
            name=name,
            corpora=corpora,
            seq_len=seq_len,
            max_tokens=max_tokens,
            batch_size=batch_size,
            progress=progress,
            size_float_bits=16,
        )
        del model
        gc.collect()
    if json_path is not None:
        payload = {name: report.to_dict() for name, report in reports.items()}
        atomic_write_text(json_path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return reports


def _same_kind(model_specs: list[str]) -> None:
    """Refuse, before any model is evaluated, to put a causal LM beside an encoder: they share no
    metric. The kind comes from each model's config (a compressed folder keeps its original's)."""
    from ffnsplit.errors import OptionError

    kinds: dict[bool, str] = {}
    for spec in model_specs:
        causal = _causal_kind(spec)
        if causal is not None:
            kinds.setdefault(causal, str(spec))
    if len(kinds) > 1:
        raise OptionError(
            f"{kinds[True]} is a causal LM and {kinds[False]} an encoder: they share no metric; "
            "compare models of one kind (e.g. a compressed model --against its original)"
        )


def _paragraphs(corpus: str, count: int) -> list[str]:
    """The first `count` paragraphs of a corpus (documents split on blank lines)."""
    from ffnsplit.data import load_corpus

    paragraphs = [p.strip() for t in load_corpus(corpus).texts for p in t.split("\n") if p.strip()]
    return paragraphs[:count]


DEFAULT_SWEEP_POINTS = ("int2-g32", "int3-g64", "int3-g32", "int4-g64", "int4-g32", "int8-g32")
"""Uniform formats naming the budgets: 3, 3.5, 4, 4.5, 5 and 9 bits per FFN weight (int8-g32 is
56% of the dense fp16 FFN: the paper's ~43% size reduction)."""


def sweep(
    model_spec: str | os.PathLike,
    profile_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    points: tuple[str, ...] = DEFAULT_SWEEP_POINTS,
    methods: tuple[str, ...] = ("uniform", "ffsplit", "random", "weight-norm"),
    corpus: str = "wiki-eval",
    max_tokens: int = 4096,
    seq_len: int = 512,
    batch_size: int = 4,
    seed: int = 0,
    calib_corpus: str = "wiki-calib",
    calib_tokens: int = 4096,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    progress=None,
) -> dict:
    """FFSplit vs baselines at equal FFN bytes over budgets; writes sweep.json and sweep.png
    into the folder `out` (atomically: both or neither)."""
    import json

    from ffnsplit import sweep as sweep_module
    from ffnsplit.errors import OptionError
    from ffnsplit.eval.perplexity import perplexity
    from ffnsplit.eval.tasks import embed_documents, is_causal_lm, similarity_spearman
    from ffnsplit.fsutil import atomic_dir, atomic_write_text, refuse_existing
    from ffnsplit.profile import Profile

    out = Path(out)
    if not points:
        raise OptionError("--points is empty: give at least one uniform format, e.g. int4-g32")
    if not methods:
        raise OptionError("--methods is empty: give at least one of uniform, ffsplit, random, "
                          "weight-norm, budget")  # fmt: skip
    sweep_module.check_options(points, methods)
    refuse_existing(out, overwrite)  # before the work; atomic_dir checks again at the end
    profile_obj = Profile.load(profile_path)
    model, tokenizer = open_model(model_spec, trust_remote_code=trust_remote_code)
    causal = is_causal_lm(model)
    # Encoders: the Lee similarity Spearman is coarse (quantization noise can raise it), so the
    # primary metric is how far embeddings move: mean cosine distance to the dense embeddings
    # of the held-out wiki-eval paragraphs.
    metric = f"ppl {corpus}" if causal else "embedding cosine distance"
    paragraphs = [] if causal else _paragraphs(corpus, 64)
    reference = None if causal else embed_documents(model, tokenizer, paragraphs)

    def evaluate_fn(candidate: nn.Module, tok) -> dict:
        if causal:
            result = perplexity(
                candidate, tok, corpus, seq_len=seq_len, max_tokens=max_tokens,
                batch_size=batch_size,
            )  # fmt: skip
            return {metric: result.ppl}
        embedded = embed_documents(candidate, tok, paragraphs)
        distance = 1.0 - torch.nn.functional.cosine_similarity(embedded, reference).mean()
        return {
            metric: float(distance),
            "similarity spearman": similarity_spearman(candidate, tok).spearman,
        }

    dense = evaluate_fn(model, tokenizer)
    calib_ids = None
    if "budget" in methods:
        from ffnsplit import data

        calib = data.load_corpus(calib_corpus)
        _check_seq_len(model, seq_len)
        calib_ids = data.token_blocks(tokenizer, calib, calib_tokens, seq_len, seed=seed)
    results = sweep_module.sweep(
        model,
        tokenizer,
        profile_obj,
        list(points),
        evaluate_fn=evaluate_fn,
        methods=methods,
        seed=seed,
        calib_ids=calib_ids,
        progress=progress,
    )
    payload = {
        "model": str(model_spec),
        "metric": metric,
        "dense": dense,
        "settings": {"corpus": corpus, "max_tokens": max_tokens, "seq_len": seq_len},
        "profile": profile_obj.meta.get("corpus"),
        "results": sweep_module.results_dict(results),
    }
    with atomic_dir(out, overwrite=overwrite) as tmp:
        text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
        atomic_write_text(tmp / "sweep.json", text)
        sweep_module.plot_sweep(
            results, metric, tmp / "sweep.png", reference=dense[metric],
            title=f"{model_spec}: {metric}",
        )  # fmt: skip
    return payload


def bench(
    model: str | os.PathLike | None = None,
    *,
    shapes: tuple[str, ...] = (),
    against: str | None = None,
    e2e_shape: str | None = None,
    ms: tuple[int, ...] | str = (1, 4, 16, 64, 256, 2048),
    light: str = "int4-g128",
    heavy_fraction: float = 0.05,
    copies: int | None = None,
    repeats: int | None = None,
    batch: int = 1,
    prompt_len: int = 512,
    decode_steps: int = 128,
    graphs: bool = True,
    decoder_kernels: str = "auto",
    light_act: str = "none",
    seed: int = 0,
    device: str = "auto",
    json_path: str | os.PathLike | None = None,
    append: str | os.PathLike | None = None,
    command: str | None = None,
    trust_remote_code: bool = False,
    log=None,
) -> dict:
    """FFN-layer latency (`shapes`, or the layers of the compressed folder `model`) and end-to-end
    throughput (`model` against its original `against`, and/or a random model of `e2e_shape`
    against its compressed twin); writes JSON and appends markdown when asked. See
    `ffnsplit.eval.bench` for what is measured and how. Returns the JSON-able payload."""
    import shlex
    import sys

    from ffnsplit.eval import bench as bench_module

    options = bench_module.BenchOptions(
        model=None if model is None else str(model),
        shapes=tuple(shapes),
        against=against,
        e2e_shape=e2e_shape,
        ms=ms,
        light=light,
        heavy_fraction=heavy_fraction,
        copies=copies,
        repeats=repeats,
        batch=batch,
        prompt_len=prompt_len,
        decode_steps=decode_steps,
        graphs=graphs,
        decoder_kernels=decoder_kernels,
        light_act=light_act,
        seed=seed,
        device=device,
        trust_remote_code=trust_remote_code,
        command=shlex.join(sys.argv) if command is None else command,
    )

    def save_so_far(partial: dict) -> None:  # a run stopped by a time limit keeps its rows
        bench_module.write_outputs({**partial, "complete": False}, json_path=json_path)

    payload = bench_module.run_bench(
        options, log=log, checkpoint=save_so_far if json_path is not None else None
    )
    payload["complete"] = True
    bench_module.write_outputs(payload, json_path=json_path, append=append)
    return payload


def generate(
    model_specs: list[str],
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    decoder: str = "auto",
    chat: bool | None = None,
    device: str = "auto",
    dtype: str | None = None,
    json_path: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """Greedy continuations of `prompts` by each model (one at a time, freed after); name ->
    list of generate.Completion. `chat` None: through the chat template when the tokenizer has
    one. JSON: the settings and every model's completions."""
    import gc
    import json

    from ffnsplit import generate as gen
    from ffnsplit.errors import OptionError
    from ffnsplit.fsutil import atomic_write_text
    from ffnsplit.runtime import resolve_device, resolve_dtype

    if max_new_tokens < 1:
        raise OptionError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    if not prompts or not all(prompt.strip() for prompt in prompts):
        raise OptionError("give a prompt with some text: --prompt TEXT (repeatable)")
    if decoder not in gen.DECODERS:
        raise OptionError(f"unknown decoder {decoder!r}: choose one of {', '.join(gen.DECODERS)}")
    run_device = resolve_device(device)
    compute_dtype = resolve_dtype(dtype)
    if compute_dtype is None and run_device.type == "cpu":
        compute_dtype = torch.float32  # fp16 checkpoints run in fp32 on the CPU
    for spec in model_specs:  # an encoder is refused before any model is loaded
        if _causal_kind(spec) is False:
            raise OptionError(
                f"{spec} is an encoder (no language-model head): generate needs a causal LM "
                "such as smollm2-135m"
            )
    results: dict[str, list] = {}
    dtypes: dict[str, str] = {}
    for spec in model_specs:
        model, tokenizer = open_model(
            spec, device=run_device, dtype=compute_dtype, trust_remote_code=trust_remote_code
        )
        dtypes[str(spec)] = dtype_name(next(model.parameters()).dtype)
        results[str(spec)] = gen.generate(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, decoder=decoder, chat=chat
        )
        del model
        gc.collect()
    if json_path is not None:
        payload = {
            "prompts": prompts,
            "max_new_tokens": max_new_tokens,
            "device": str(run_device),
            "models": {
                name: {"dtype": dtypes[name], "completions": [c.to_dict() for c in items]}
                for name, items in results.items()
            },
        }
        atomic_write_text(json_path, json.dumps(payload, indent=2) + "\n")
    return results


def _causal_kind(spec: str) -> bool | None:
    """True for a causal LM, False for an encoder, None when the config does not say, read
    without loading the weights (a compressed folder keeps its original's architectures)."""
    import json

    from ffnsplit import io, models

    path = Path(str(spec)).expanduser()
    if path.is_dir() and io.is_compressed_dir(path):
        archs = json.loads((path / "config.json").read_text()).get("architectures") or []
        return any(name.endswith("ForCausalLM") for name in archs) if archs else None
    return models.resolve_model(spec).causal_lm
