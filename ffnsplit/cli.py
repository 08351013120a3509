"""The `ffnsplit` command line: thin typer commands over `ffnsplit.api`, rich output, one-line errors."""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    name="ffnsplit",
    help="Split transformer FFNs into heavy-hitter neurons (kept fp16) and light neurons "
    "(compressed hard); profile, compress, evaluate and benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

ModelArg = Annotated[
    str,
    typer.Argument(
        help="Packaged model short name (smollm2-135m, gemma3-270m, minilm-l6), a local HF folder, "
        "a compressed ffnsplit folder, or a cached hub id."
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")]
DtypeOpt = Annotated[
    str,
    typer.Option("--dtype", help="Compute dtype: auto (as stored), float32, float16, bfloat16."),
]
JsonOverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace an existing --json file.")
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Allow models whose code lives in their folder (runs that code).",
    ),
]


@app.callback()
def _quiet_libraries() -> None:
    """ffnsplit draws its own progress: silence transformers' bars and advisory warnings."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def friendly_errors(func):
    """Turn every failure into one line on stderr and a non-zero exit; never a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from ffnsplit.errors import FFNSplitError

        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except FFNSplitError as exc:
            _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted: nothing was left half-written", 130)
        except FileNotFoundError as exc:
            _fail(f"no such file or folder: {exc.filename or exc}: check the path")
        except PermissionError as exc:
            _fail(
                f"permission denied: {exc.filename or exc}: check the file's permissions"
                + _cache_hint(exc.filename)
            )
        except IsADirectoryError as exc:
            _fail(f"{exc.filename} is a folder where a file was expected")
        except NotADirectoryError as exc:
            _fail(f"a file stands where a folder is expected in {exc.filename}: check the path")
        except OSError as exc:
            if exc.errno == errno.EROFS:
                _fail(
                    f"read-only file system: {exc.filename or exc}: choose another location"
                    + _cache_hint(exc.filename)
                )
            if exc.errno == errno.ENOSPC:
                from ffnsplit.fsutil import disk_full_message

                _fail(disk_full_message(exc.filename or "a file"))
            _unexpected(exc)
        except Exception as exc:  # noqa: BLE001 - the last line of defence for the CLI
            _unexpected(exc)

    return wrapper


def _cache_hint(filename: object) -> str:
    """' (... FFNSPLIT_CACHE ...)' when `filename` lies in ffnsplit's cache, else ''."""
    from ffnsplit.models import cache_root

    try:
        root = cache_root().resolve()
        inside = filename is not None and root in Path(str(filename)).resolve().parents
    except Exception:  # noqa: BLE001 - only a hint
        return ""
    return " (the model cache: set FFNSPLIT_CACHE to a writable folder)" if inside else ""


def _unexpected(exc: BaseException) -> None:
    """Anything else: out of memory, or a bug of ours (one line; FFNSPLIT_DEBUG=1 re-raises)."""
    from ffnsplit.runtime import is_out_of_memory

    if is_out_of_memory(exc):
        _fail(
            "out of memory: lower --batch-size, use --sequential (one layer on the GPU at a time) "
            "or another --device"
        )
    if os.environ.get("FFNSPLIT_DEBUG"):
        raise exc
    first = str(exc).splitlines()[0] if str(exc) else ""
    _fail(
        f"internal error ({type(exc).__name__}: {first[:300]}); "
        "rerun with FFNSPLIT_DEBUG=1 for the traceback and report it",
        1,
    )


def _write_json(path: Path, payload: dict) -> None:
    from ffnsplit.fsutil import atomic_write_text

    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


@app.command("models")
@friendly_errors
def models_command() -> None:
    """List the packaged models: family, parameters, FFN share, cached or not."""
    from rich.table import Table

    from ffnsplit.models import DEFAULT_MODEL, packaged_models

    infos = packaged_models()
    table = Table(
        title="Packaged models (no download needed)",
        caption="cached: converted for transformers (done once, on first use)",
    )
    # a name is what users type: never cut (a long "cached" note on a narrow terminal had cut
    # "smollm2-135m" to "smollm2-13…")
    table.add_column("name", min_width=max(len(info.name) for info in infos))
    for column in ("family", "parameters", "FFN share", "installed", "cached"):
        table.add_column(
            column, justify="right" if column in ("parameters", "FFN share") else "left"
        )
    for info in infos:
        name = info.name + (" (default)" if info.name == DEFAULT_MODEL else "")
        params = f"{info.parameters / 1e6:.1f} M" if info.parameters else "-"
        share = f"{info.ffn_share:.1%}" if info.ffn_share is not None else "-"
        installed = "yes" if info.installed else f"no: {info.install}"
        cached = "yes" if info.cached else "no"
        table.add_row(name, info.family, params, share, installed, cached)
    console.print(table)


@app.command("info")
@friendly_errors
def info_command(
    model: ModelArg = "smollm2-135m",
    trust_remote_code: TrustOpt = False,
) -> None:
    """Per-layer FFN table (shapes, activation, dtype, parameters) and the FFN share of the model."""
    from rich.table import Table

    from ffnsplit.api import model_info, open_model

    loaded, _ = open_model(model, trust_remote_code=trust_remote_code)
    info = model_info(loaded)
    table = Table(title=f"{model}: {info.model_type}, {len(info.layers)} FFN blocks")
    for column in ("layer", "module", "kind", "H -> I", "act", "gated", "dtype", "params", "bytes"):
        table.add_column(
            column, justify="right" if column in ("layer", "params", "bytes") else "left"
        )
    for layer in info.layers:
        table.add_row(
            str(layer.layer),
            layer.name,
            layer.kind,
            f"{layer.hidden_size} -> {layer.intermediate_size}",
            layer.activation,
            "yes" if layer.gated else "no",
            layer.dtype,
            f"{layer.parameters:,}",
            _human_bytes(layer.nbytes),
        )
    console.print(table)
    console.print(
        f"FFN: {info.ffn_parameters:,} of {info.total_parameters:,} parameters "
        f"([bold]{info.ffn_parameters / info.total_parameters:.1%}[/]), "
        f"{_human_bytes(info.ffn_bytes)} of {_human_bytes(info.total_bytes)} weight bytes "
        f"([bold]{info.ffn_bytes / info.total_bytes:.1%}[/])"
    )


def _progress():
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ffnsplit.profile import TokensPerSecondColumn

    class _Progress(Progress):
        """Bars that stay on success and are cleared on failure (the error line stands alone)."""

        def __exit__(self, exc_type, exc, tb) -> None:
            if exc_type is None:
                return super().__exit__(exc_type, exc, tb)
            self.live.transient = True  # a terminal erases the bars
            quiet = self.console.quiet
            self.console.quiet = quiet or not self.console.is_terminal  # a file: no empty line
            try:
                super().__exit__(exc_type, exc, tb)
            finally:
                self.console.quiet = quiet

    return _Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f}"),
        TokensPerSecondColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    )


@app.command("profile")
@friendly_errors
def profile_command(
    model: ModelArg = "smollm2-135m",
    corpus: Annotated[
        str,
        typer.Option(
            help="Corpus name (wiki-calib, lee-news, ...) or a .txt/.jsonl file or folder."
        ),
    ] = "wiki-calib",
    tokens: Annotated[int, typer.Option(help="Calibration tokens.")] = 32768,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per calibration block.")] = 512,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Blocks per forward pass.")] = 8,
    topk: Annotated[
        float, typer.Option("--topk", help="Fraction of neurons counted as a token's top neurons.")
    ] = 0.05,
    out: Annotated[
        Path, typer.Option("--out", help="Where to write the profile (safetensors).")
    ] = Path("profile.safetensors"),
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="Also draw the heavy-hitter summary to this image (.png, .pdf, .svg, .jpg).",
        ),
    ] = None,
    show: Annotated[
        Path | None,
        typer.Option("--show", help="Print the summary of an existing profile and exit."),
    ] = None,
    sequential: Annotated[
        bool | None,
        typer.Option(
            "--sequential/--no-sequential",
            help="Run one decoder layer at a time on the device (models larger than the GPU). Default: automatic.",
        ),
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    seed: Annotated[int, typer.Option(help="Seed for choosing calibration blocks.")] = 0,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing --out / --plot file.")
    ] = False,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Score every FFN neuron on calibration text and show how few carry most of the output."""
    from ffnsplit import api
    from ffnsplit.fsutil import check_output
    from ffnsplit.profile import Profile, summary_table

    if show is None:
        out = check_output(out, "--out", overwrite=overwrite, inputs=(model,))
    if plot is not None:
        from ffnsplit.plotting import plot_format

        plot = check_output(plot, "--plot", overwrite=overwrite, inputs=(model, show))
        plot_format(plot)

    if show is not None:
        result = Profile.load(show)
        if plot is not None:
            from ffnsplit.plotting import plot_profile

            plot_profile(result, plot)
    else:
        with _progress() as progress:
            result = api.profile(
                model,
                corpus=corpus,
                tokens=tokens,
                seq_len=seq_len,
                batch_size=batch_size,
                topk_fraction=topk,
                device=device,
                dtype=dtype,
                sequential=sequential,
                seed=seed,
                out=out,
                plot=plot,
                trust_remote_code=trust_remote_code,
                progress=progress,
            )
    console.print(summary_table(result))
    if show is None:
        console.print(f"profile written to [bold]{out}[/]")
    if plot is not None:
        console.print(f"plot written to [bold]{plot}[/]")


def _task_callback(progress, description: str):
    """A (done, total) callback drawing one rich progress task."""
    task = progress.add_task(description, total=1, unit=None)

    def report(done: float, total: float) -> None:
        progress.update(task, completed=done, total=total)

    return report


@app.command("compress")
@friendly_errors
def compress_command(
    model: ModelArg = "smollm2-135m",
    profile: Annotated[
        Path, typer.Option("--profile", help="Profile from `ffnsplit profile` (same model).")
    ] = Path("profile.safetensors"),
    out: Annotated[Path, typer.Option("--out", help="Output folder (written atomically).")] = Path(
        "compressed"
    ),
    light: Annotated[
        str,
        typer.Option(
            "--light",
            help="Light part format: intB-gG[-sym][-gptq] (B 2/3/4/8, G 32/64/128/pc), lowrank-rR[-w], lowrank-F[-w], dense, pruned.",
        ),
    ] = "int4-g128",
    heavy_fraction: Annotated[
        float | None,
        typer.Option(
            "--heavy-fraction",
            help="Fraction of neurons kept dense per layer (default 0.05; 0 for --baseline uniform).",
        ),
    ] = None,
    heavy_share: Annotated[
        float | None,
        typer.Option(
            "--heavy-share",
            help="Instead: fewest neurons carrying this share of each layer's output norm.",
        ),
    ] = None,
    target_bits: Annotated[
        float | None,
        typer.Option(
            "--target-bits",
            help="Budget mode: average stored bits per FFN weight; heavy fraction and light format chosen per layer.",
        ),
    ] = None,
    target_size: Annotated[
        float | None,
        typer.Option("--target-size", help="Budget mode: fraction of the dense fp16 FFN bytes."),
    ] = None,
    prune_fraction: Annotated[
        float,
        typer.Option("--prune-fraction", help="Fraction of the coldest neurons removed outright."),
    ] = 0.0,
    heavy_dtype: Annotated[
        str, typer.Option("--heavy-dtype", help="float16 or bfloat16.")
    ] = "float16",
    baseline: Annotated[
        str,
        typer.Option(
            "--baseline",
            help="ffsplit (heavy set by output norm), or a baseline at the same size: uniform (no split), random, weight-norm.",
        ),
    ] = "ffsplit",
    calib_corpus: Annotated[
        str, typer.Option("--calib-corpus", help="Calibration text for GPTQ / weighted low-rank.")
    ] = "wiki-calib",
    calib_tokens: Annotated[
        int, typer.Option("--calib-tokens", help="Calibration tokens for GPTQ / weighted low-rank.")
    ] = 8192,
    seq_len: Annotated[int, typer.Option("--seq-len")] = 512,
    seed: Annotated[int, typer.Option(help="Seed (random baseline, calibration blocks).")] = 0,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing --out folder.")
    ] = False,
    device: DeviceOpt = "auto",
    trust_remote_code: TrustOpt = False,
) -> None:
    """Split every FFN into heavy (dense) and light (compressed) neurons and save the model."""
    from ffnsplit import api
    from ffnsplit.fsutil import check_output

    out = check_output(out, "--out", folder=True, overwrite=overwrite, inputs=(model, profile))
    options = api.CompressOptions(
        light=light,
        heavy_fraction=heavy_fraction,
        heavy_share=heavy_share,
        target_bits=target_bits,
        target_size=target_size,
        prune_fraction=prune_fraction,
        heavy_dtype=heavy_dtype,
        baseline=baseline,
        calib_corpus=calib_corpus,
        calib_tokens=calib_tokens,
        seq_len=seq_len,
        seed=seed,
    )
    with _progress() as progress:
        report = api.compress(
            model,
            profile,
            out,
            options,
            device=device,
            overwrite=overwrite,
            trust_remote_code=trust_remote_code,
            progress=_task_callback(progress, "compressing FFNs"),
        )
    console.print(
        f"wrote [bold]{out}[/]: FFN {_human_bytes(report['ffn_bytes'])} "
        f"({report['ffn_size_fraction']:.1%} of dense fp16, {report['average_ffn_bits']:.2f} bits "
        f"per weight), model {_human_bytes(report['total_bytes'])}"
    )
    _warn_if_not_smaller(report)


def _warn_if_not_smaller(report: dict) -> None:
    if report["ffn_size_fraction"] >= 1.0:
        err_console.print(
            f"[yellow]warning:[/] the compressed FFNs are {report['ffn_size_fraction']:.0%} of "
            "dense fp16: this light format saves nothing here; use a lower rank or a quantized "
            "--light format",
            highlight=False,
        )


def _stage_callback(progress):
    """A (stage, done, total) callback: one rich progress task per evaluation stage."""
    tasks: dict[str, int] = {}

    def report(stage: str, done: float, total: float) -> None:
        if stage not in tasks:
            unit = "tok" if stage.startswith("perplexity") else None  # others count examples
            tasks[stage] = progress.add_task(stage, total=total or 1, unit=unit)
        progress.update(tasks[stage], completed=done, total=total or 1)

    return report


@app.command("eval")
@friendly_errors
def eval_command(
    model: ModelArg = "smollm2-135m",
    against: Annotated[
        list[str] | None,
        typer.Option(
            "--against", help="Other model(s) to compare with, side by side (repeatable)."
        ),
    ] = None,
    corpora: Annotated[
        str, typer.Option("--corpora", help="Comma-separated perplexity corpora.")
    ] = "wiki-eval,lee-news",
    seq_len: Annotated[int, typer.Option("--seq-len", help="Perplexity window (tokens).")] = 512,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", help="Evaluated tokens per corpus.")
    ] = 16384,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 4,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Write all results to this JSON file.")
    ] = None,
    overwrite: JsonOverwriteOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False,
    light_act: Annotated[
        str,
        typer.Option(
            "--light-act",
            help="MODEL's light-part activations: none, or int8 (quantized per token for int8 "
            "tensor-core products; compare with --against the same checkpoint).",
        ),
    ] = "none",
) -> None:
    """Perplexity, zero-shot polarity (causal LMs) or similarity (encoders), sizes; side by side.

    With --against, that model is the reference column and MODEL's deltas are against it.
    """
    from ffnsplit import api
    from ffnsplit.eval.compare import comparison_table
    from ffnsplit.fsutil import check_output

    if json_file is not None:
        json_file = check_output(
            json_file, "--json", overwrite=overwrite, inputs=(model, *(against or ()))
        )

    specs = [*(against or []), model]  # the --against model(s) are the reference column
    with _progress() as progress:
        reports = api.evaluate(
            specs,
            corpora=tuple(c.strip() for c in corpora.split(",") if c.strip()),
            seq_len=seq_len,
            max_tokens=max_tokens,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            json_path=json_file,
            trust_remote_code=trust_remote_code,
            progress=_stage_callback(progress),
            light_act=["none"] * (len(specs) - 1) + [light_act],
        )
    console.print(comparison_table(reports))
    if all(not report.perplexity for report in reports.values()):
        console.print(
            "[dim]encoders are scored by sentence similarity on their own pairs: --corpora, "
            "--seq-len and --max-tokens apply to causal LMs only[/]"
        )
    if json_file is not None:
        console.print(f"results written to [bold]{json_file}[/]")


@app.command("generate")
@friendly_errors
def generate_command(
    model: ModelArg = "smollm2-135m",
    prompt: Annotated[
        list[str] | None,
        typer.Option("--prompt", "-p", help="Text to continue (repeatable: one run each)."),
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", help="New tokens at most (greedy).")
    ] = 64,
    chat: Annotated[
        bool | None,
        typer.Option(
            "--chat/--raw",
            help="Through the tokenizer's chat template as a user message, or as plain text "
            "(default: the template when there is one).",
        ),
    ] = None,
    against: Annotated[
        list[str] | None,
        typer.Option("--against", help="Other model(s) given the same prompts, side by side."),
    ] = None,
    decoder: Annotated[
        str,
        typer.Option(
            "--decoder",
            help="static (ffnsplit's static-cache decoder, CUDA graphs on a GPU; Llama-style "
            "models), hf (the model's own generate) or auto.",
        ),
    ] = "auto",
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Write the completions to this JSON file.")
    ] = None,
    overwrite: JsonOverwriteOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False,
) -> None:
    """Greedy text from a model (compressed or not), with its prefill and decode speed.

    With --against, each prompt goes to the other model(s) too, and each of their completions
    says how many leading tokens it shares with MODEL's.
    """
    from ffnsplit import api
    from ffnsplit.fsutil import check_output

    if json_file is not None:
        json_file = check_output(
            json_file, "--json", overwrite=overwrite, inputs=(model, *(against or ()))
        )
    specs = [model, *(against or [])]
    with console.status("generating"):
        results = api.generate(
            specs,
            prompt or [],
            max_new_tokens=max_new_tokens,
            decoder=decoder,
            chat=chat,
            device=device,
            dtype=dtype,
            json_path=json_file,
            trust_remote_code=trust_remote_code,
        )
    _print_completions(results)
    if json_file is not None:
        console.print(f"completions written to [bold]{json_file}[/]")


def _print_completions(results: dict) -> None:
    """Each prompt, then each model's completion under a line of its numbers."""
    from rich.markup import escape

    from ffnsplit.generate import agreement

    names = list(results)
    for index in range(len(results[names[0]])):
        console.rule(f"[bold]prompt {index + 1}[/]: {escape(results[names[0]][index].prompt)}")
        for name in names:
            c = results[name][index]
            facts = [f"{c.decoder} decoder ({c.timing})", f"{len(c.tokens)} tokens ({c.stop})"]
            if c.prefill_ms is not None:
                facts.append(f"prefill {c.prefill_ms:,.1f} ms for {c.prompt_tokens} tokens")
            if c.decode_tokens_per_s is not None:
                facts.append(f"decode {c.decode_tokens_per_s:,.1f} tok/s")
            first = results[names[0]][index]
            if name != names[0] and c.prompt_ids != first.prompt_ids:
                facts.append("another tokenizer or template: tokens not compared")
            elif name != names[0]:
                same = agreement(first.tokens, c.tokens)
                facts.append(f"its first {same} of {len(first.tokens)} tokens as {names[0]}'s")
            console.print(f"[bold cyan]{escape(name)}[/] [dim]{escape(' · '.join(facts))}[/]")
            console.print(escape(c.text.strip()), highlight=False)  # JSON: the text as is


@app.command("demo")
@friendly_errors
def demo_command(
    model: ModelArg = "smollm2-135m",
    out: Annotated[
        Path, typer.Option("--out", help="Folder for the profile, plot, checkpoint and results.")
    ] = Path("ffnsplit-demo"),
    tokens: Annotated[int, typer.Option(help="Calibration tokens for the profile.")] = 8192,
    light: Annotated[str, typer.Option("--light", help="Light part format.")] = "int4-g128",
    heavy_fraction: Annotated[float, typer.Option("--heavy-fraction")] = 0.05,
    eval_tokens: Annotated[
        int, typer.Option("--eval-tokens", help="Evaluated tokens per corpus.")
    ] = 4096,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace an existing --out folder (it is restored if the run fails).",
        ),
    ] = False,
    device: DeviceOpt = "auto",
) -> None:
    """The main job end to end: profile -> compress -> evaluate against the original."""
    from ffnsplit import api
    from ffnsplit.fsutil import check_output, replace_dir
    from ffnsplit.models import resolve_model
    from ffnsplit.plan import parse_light_format

    # Everything that can be checked is checked before the first step writes anything.
    out = check_output(out, "--out", folder=True, overwrite=overwrite, inputs=(model,))
    resolve_model(model)
    parse_light_format(light)
    options = api.CompressOptions(light=light, heavy_fraction=heavy_fraction)
    if eval_tokens < 1:
        _fail(f"--eval-tokens must be at least 1 (got {eval_tokens})")
    with replace_dir(out, overwrite=overwrite):
        _demo_steps(model, out, tokens, options, eval_tokens, device)
    console.print(f"profile, plot, checkpoint and eval.json are in [bold]{out}[/]")


def _demo_steps(model: str, out: Path, tokens: int, options, eval_tokens: int, device: str) -> None:
    from ffnsplit import api
    from ffnsplit.eval.compare import comparison_table
    from ffnsplit.profile import summary_table

    light, heavy_fraction = options.light, options.heavy_fraction
    console.rule(f"[bold]1/3 profile {model}")
    with _progress() as progress:
        profile_result = api.profile(
            model,
            tokens=tokens,
            device=device,
            out=out / "profile.safetensors",
            plot=out / "profile.png",
            progress=progress,
        )
    console.print(summary_table(profile_result))
    console.rule(f"[bold]2/3 compress: {light} light neurons, {heavy_fraction:.0%} heavy in fp16")
    with _progress() as progress:
        report = api.compress(
            model,
            out / "profile.safetensors",
            out / "compressed",
            options,
            device=device,
            progress=_task_callback(progress, "compressing FFNs"),
        )
    console.print(
        f"FFN {_human_bytes(report['ffn_bytes'])} = {report['ffn_size_fraction']:.1%} of dense "
        f"fp16, {report['average_ffn_bits']:.2f} bits per weight"
    )
    console.rule("[bold]3/3 evaluate against the original")
    with _progress() as progress:
        reports = api.evaluate(
            [model, str(out / "compressed")],
            corpora=("wiki-eval",),
            max_tokens=eval_tokens,
            device=device,
            json_path=out / "eval.json",
            progress=_stage_callback(progress),
        )
    console.print(comparison_table(reports))


@app.command("sweep")
@friendly_errors
def sweep_command(
    model: ModelArg = "smollm2-135m",
    profile: Annotated[Path, typer.Option("--profile", help="Profile of MODEL.")] = Path(
        "profile.safetensors"
    ),
    out: Annotated[Path, typer.Option("--out", help="Folder for sweep.json and sweep.png.")] = Path(
        "sweep"
    ),
    points: Annotated[
        str,
        typer.Option(
            "--points", help="Comma-separated uniform formats naming the budgets (group 32 or 64)."
        ),
    ] = "int2-g32,int3-g64,int3-g32,int4-g64,int4-g32,int8-g32",
    methods: Annotated[
        str, typer.Option("--methods", help="uniform, ffsplit, random, weight-norm, budget.")
    ] = "uniform,ffsplit,random,weight-norm",
    corpus: Annotated[
        str, typer.Option("--corpus", help="Perplexity corpus (causal LMs).")
    ] = "wiki-eval",
    max_tokens: Annotated[int, typer.Option("--max-tokens")] = 4096,
    seq_len: Annotated[int, typer.Option("--seq-len")] = 512,
    seed: Annotated[int, typer.Option(help="Seed of the random baseline.")] = 0,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing --out folder.")
    ] = False,
    trust_remote_code: TrustOpt = False,
) -> None:
    """FFSplit against uniform, random-heavy and weight-norm-heavy baselines at equal FFN bytes."""
    from rich.table import Table

    from ffnsplit import api
    from ffnsplit.fsutil import check_output

    out = check_output(out, "--out", folder=True, overwrite=overwrite, inputs=(model, profile))

    with _progress() as progress:
        payload = api.sweep(
            model,
            profile,
            out,
            points=tuple(p.strip() for p in points.split(",") if p.strip()),
            methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
            corpus=corpus,
            max_tokens=max_tokens,
            seq_len=seq_len,
            seed=seed,
            overwrite=overwrite,
            trust_remote_code=trust_remote_code,
            progress=_task_callback(progress, "compress + evaluate"),
        )
    metric = payload["metric"]
    table = Table(
        title=f"{model}: {metric} at equal FFN bytes (dense: {payload['dense'][metric]:.4g})"
    )
    for column in ("budget (uniform fmt)", "method", "light", "heavy %", "avg bits", metric):
        table.add_column(column)
    for row in payload["results"]:
        table.add_row(
            row["point"],
            row["method"],
            row["light"],
            f"{row['heavy_fraction']:.1%}",
            f"{row['average_bits']:.3f}",
            f"{row['metrics'][metric]:.4g}",
        )
    console.print(table)
    console.print(f"sweep.json and sweep.png written to [bold]{out}[/]")


def _us(value: float) -> str:
    """Microseconds for the layer table: one decimal below 1,000 (a table of 9 columns then fits
    80 characters without truncated cells)."""
    return f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def _layer_table(case: dict):
    from rich.table import Table

    from ffnsplit.eval.bench import METHODS, W4A8_METHOD, max_errors

    by = {(r["m"], r["method"]): r for r in case["rows"] if "us" in r}
    methods = [m for m in (*METHODS, W4A8_METHOD) if any(key[1] == m for key in by)]
    short = {"torch_int4": "int4", "kernel_A": "A", "kernel_B": "B", "reference": "ref",
             W4A8_METHOD: "w4a8"}  # fmt: skip
    table = Table(
        title=f"{case['label']}: us per call; ffnsplit x byte floor, speedup vs dense; "
        "last row: largest relative error",
        title_justify="left",
        show_footer=True,
    )
    table.add_column("M", "error", justify="right")
    errors = max_errors(case)
    for method in methods:
        table.add_column(short.get(method, method), f"{errors[method]:.0e}", justify="right")
    table.add_column("x floor", justify="right")
    table.add_column("speedup", justify="right")
    for m in sorted({r["m"] for r in case["rows"]}):
        cells = [_us(by[(m, k)]["us"]) if (m, k) in by else "-" for k in methods]
        split = by.get((m, "ffnsplit"), {})
        floor, speedup = split.get("x_floor"), split.get("vs_dense")
        table.add_row(
            str(m),
            *cells,
            "-" if floor is None else f"{floor:.2f}",
            "-" if speedup is None else f"{speedup:.2f}x",
        )
    return table


def _e2e_table(run: dict):
    from rich.table import Table

    dense, compressed = run["dense"], run["compressed"]
    timing = {dense["decode_timing"], compressed["decode_timing"]}
    prefill = {dense.get("prefill_timing", "eager"), compressed.get("prefill_timing", "eager")}
    table = Table(
        title=f"end-to-end {run['source']}: batch {run['batch']}, prompt {run['prompt_len']} "
        f"({', '.join(sorted(prefill))}), {run['decode_steps']} decode steps "
        f"({', '.join(sorted(timing))}), {run['dtype']}",
        title_justify="left",
    )
    for column in ("model", "weights", "prefill tok/s", "decode tok/s", "ms/step", "peak mem"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for label, m in (("dense", dense), ("compressed", compressed)):
        peak = m["peak_memory_bytes"]
        table.add_row(
            label,
            _human_bytes(m["weights_bytes"]),
            f"{m['prefill_tokens_per_s']:,.0f}",
            f"{m['decode_tokens_per_s']:,.1f}",
            f"{m['decode_ms_per_step']:.2f}",
            "-" if peak is None else _human_bytes(peak),
        )

    def ratio(key: str, digits: int = 2) -> str:
        return "-" if run[key] is None else f"{run[key]:.{digits}f}x"

    table.add_row(
        "[bold]ratio",
        ratio("weights_ratio"),
        ratio("prefill_speedup"),
        f"[bold]{ratio('decode_speedup', 3)}",  # three digits: 1.798x must not read as 1.80x
        "",
        ratio("peak_memory_ratio"),
    )
    return table


def _command_line(ctx: typer.Context) -> str:
    """The command as typed, normalised: the arguments, then every option not at its default."""
    import shlex

    words = ["ffnsplit", ctx.info_name or "bench"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or value == param.default or value == ():
            continue
        if param.param_type_name == "argument":
            words.append(str(value))
        elif getattr(param, "is_flag", False):  # differs from its default: the other spelling
            words.append(param.opts[0] if value else param.secondary_opts[0])
        elif getattr(param, "multiple", False):
            for item in value:
                words += [param.opts[0], str(item)]
        else:
            words += [param.opts[0], str(value)]
    return shlex.join(words)


@app.command("bench")
@friendly_errors
def bench_command(
    ctx: typer.Context,
    model: Annotated[
        str | None,
        typer.Argument(
            help="A compressed ffnsplit folder: benchmark its FFN layers (and the whole model "
            "with --against)."
        ),
    ] = None,
    shape: Annotated[
        list[str] | None,
        typer.Option(
            "--shape",
            help="FFN layer shape HxI with random weights (repeatable); 4096x14336 (Llama-3-8B) "
            "when nothing else is asked for.",
        ),
    ] = None,
    m: Annotated[
        str, typer.Option("--m", help="Comma-separated row counts M (tokens per layer call).")
    ] = "1,4,16,64,256,2048",
    light: Annotated[
        str,
        typer.Option("--light", help="Light format of --shape layers and the e2e twin (RTN)."),
    ] = "int4-g128",
    heavy_fraction: Annotated[
        float,
        typer.Option("--heavy-fraction", help="Heavy (fp16) neurons of --shape layers / twin."),
    ] = 0.05,
    against: Annotated[
        str | None,
        typer.Option(
            "--against", help="Dense original of MODEL: end-to-end prefill/decode comparison."
        ),
    ] = None,
    e2e_shape: Annotated[
        str | None,
        typer.Option(
            "--e2e-shape",
            help="End-to-end on a random-weight model of this shape and its compressed twin: "
            "llama3-8b, llama2-7b, llama3.2-1b, smollm2-135m, tiny.",
        ),
    ] = None,
    batch: Annotated[int, typer.Option("--batch", help="End-to-end batch size.")] = 1,
    prompt_len: Annotated[
        int, typer.Option("--prompt-len", help="End-to-end prompt (prefill) tokens.")
    ] = 512,
    decode_steps: Annotated[
        int, typer.Option("--decode-steps", help="End-to-end timed decode steps.")
    ] = 128,
    copies: Annotated[
        int | None,
        typer.Option(
            "--copies", help="Rotating weight copies (default: enough to defeat the L2 cache)."
        ),
    ] = None,
    repeats: Annotated[
        int | None,
        typer.Option("--repeats", help="Timed repetitions per median (default 15 GPU, 3 CPU)."),
    ] = None,
    graphs: Annotated[
        bool, typer.Option("--graphs/--no-graphs", help="Time through CUDA graphs.")
    ] = True,
    decoder_kernels: Annotated[
        str,
        typer.Option(
            "--decoder-kernels",
            help="End-to-end norms / rotary / cache / attention: auto (triton on CUDA), triton "
            "(fused kernels), torch (the model's own modules and SDPA).",
        ),
    ] = "auto",
    light_act: Annotated[
        str,
        typer.Option(
            "--light-act",
            help="int8: the layer bench adds the split FFN on int8 light activations (W4A8).",
        ),
    ] = "none",
    seed: Annotated[int, typer.Option(help="Seed of random weights, heavy sets, prompts.")] = 0,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Write every result to this JSON file.")
    ] = None,
    append: Annotated[
        Path | None,
        typer.Option("--append", help="Append a markdown section to this results file."),
    ] = None,
    overwrite: JsonOverwriteOpt = False,
    device: Annotated[
        str,
        typer.Option("--device", help="auto (a GPU), cuda, cuda:N, or cpu (smoke numbers only)."),
    ] = "auto",
    trust_remote_code: TrustOpt = False,
) -> None:
    """FFN-layer latency against dense fp16 and torch int4, and end-to-end tokens/s and memory."""
    from ffnsplit import api
    from ffnsplit.eval import bench
    from ffnsplit.fsutil import check_output

    if json_file is not None:
        json_file = check_output(json_file, "--json", overwrite=overwrite, inputs=(model, against))
    if append is not None:
        append = check_output(append, "--append", may_exist=True, inputs=(model, against))

    payload = api.bench(
        model,
        shapes=tuple(shape or ()),
        against=against,
        e2e_shape=e2e_shape,
        ms=m,
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
        json_path=json_file,
        append=append,
        command=_command_line(ctx),
        trust_remote_code=trust_remote_code,
        log=lambda message: err_console.print(message, markup=False, highlight=False),
    )
    bandwidth = payload.get("copy_GBps")
    console.print(
        f"[bold]{payload['card']}[/], torch {payload['torch']}, triton {payload['triton']}, "
        f"transformers {payload['transformers']}"
        + (f"; copy bandwidth {bandwidth:.0f} GB/s" if bandwidth else "")
    )
    for case in payload["layers"]:
        console.print(_layer_table(case))
        for note in case["notes"]:
            console.print(f"note: {note}", highlight=False)
    for run in payload["e2e"]:
        console.print(_e2e_table(run))
        console.print(bench.logits_line(run), highlight=False)
    for note in payload["notes"]:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    for path, what in ((json_file, "results"), (append, "markdown")):
        if path is not None:
            console.print(f"{what} written to [bold]{path}[/]")


def _click_errors(name: str) -> tuple[type[BaseException], ...]:
    """The exception class `name` of typer's bundled click (typer >= 0.24) and of click itself
    (older typer): whichever the installed typer raises."""
    import importlib

    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if cls is not None:
            found.append(cls)
    return tuple(found)


def main(argv: list[str] | None = None) -> int:
    """The console entry point: the app, with command-line mistakes (unknown option, a value of
    the wrong type, a missing argument) reported in one line like every other failure."""
    try:
        result = app(args=argv, prog_name="ffnsplit", standalone_mode=False)
    except _click_errors("NoArgsIsHelpError") as exc:
        ctx = getattr(exc, "ctx", None)
        console.print(ctx.get_help() if ctx else str(exc), highlight=False)
        return 0
    except _click_errors("UsageError") as exc:
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx else "ffnsplit"
        err_console.print(
            f"[bold red]error:[/] {exc.format_message()} (see {where} --help)",
            highlight=False,
            soft_wrap=True,
            markup=True,
        )
        return int(getattr(exc, "exit_code", 2))
    except (typer.Abort, *_click_errors("Abort")):
        err_console.print("[bold red]error:[/] interrupted: nothing was left half-written")
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
