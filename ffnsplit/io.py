"""Compressed checkpoints: save a model whose FFNs are SplitFFNs, and load it back.

A checkpoint folder holds `model.safetensors` (or `model-0000i-of-0000n.safetensors` shards with a
`model.safetensors.index.json` when over 2 GB), `config.json` with a `quantization_config`
(`quant_method: ffnsplit`, `format_version`, the layout of every SplitFFN, tied-weight aliases
and a sha256 of every tensor file), the tokenizer files, `plan.json` and `size_report.json`.
The folder is written under a temporary name and renamed into place (fsutil.atomic_dir), and
the same inputs give byte-identical files.

Loading reads only JSON and safetensors (never a pickle, whatever else the folder holds): the
architecture is built with its parameters on the meta device, SplitFFN skeletons are installed,
every tensor file's header is checked against the expected names, dtypes and shapes before any
tensor is read, and the tensors are assigned in place (no dense copy of the model is made).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path

import torch
from torch import Tensor, nn

import ffnsplit
from ffnsplit.arch import decoder_layers, get_ffn_blocks
from ffnsplit.errors import CheckpointError, FFNSplitError
from ffnsplit.fsutil import atomic_dir, refuse_existing
from ffnsplit.modules import PackedWeight, SplitFFN
from ffnsplit.plan import SplitPlan, average_bits, dense_ffn_bytes, plan_ffn_bytes

QUANT_METHOD = "ffnsplit"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
MAX_SHARD_BYTES = 2 * 1024**3
_MAX_HEADER_BYTES = 100 * 1024**2
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# The tensor names only a SplitFFN has (heavy_up, light_down.plane0, qheavy_gate_bias, ...).
_SPLIT_TENSOR = re.compile(
    r"\.(heavy_(up|gate|down)|(light|qheavy)_(up|gate)_bias|(light|qheavy|lowrank)_(up|gate|down)\.\w+)$"
)


def find_split_tensor(names: object) -> str | None:
    """The first (sorted) tensor name among `names` that only a SplitFFN writes, else None."""
    return next((name for name in sorted(names) if _SPLIT_TENSOR.search(name)), None)


def _split_modules(model: nn.Module) -> dict[str, tuple[int, SplitFFN]]:
    """name -> (FFN layer, SplitFFN) for a fully compressed model, in layer order."""
    names = {id(module): name for name, module in model.named_modules()}
    found: dict[str, tuple[int, SplitFFN]] = {}
    for index, layer in enumerate(decoder_layers(model)):
        splits = [m for m in layer.modules() if isinstance(m, SplitFFN)]
        if len(splits) != 1:
            raise FFNSplitError(
                f"decoder layer {index} has {len(splits)} SplitFFN modules, expected 1: compress "
                "the model (apply.compress_model) before saving it"
            )
        found[names[id(splits[0])]] = (index, splits[0])
    return found


def _tensors_and_aliases(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The state dict without duplicates: a tensor shared by several keys (tied embeddings) is
    stored once, under its first key; the others become aliases."""
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().to("cpu").contiguous()
    return tensors, aliases


def _shards(tensors: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    """Tensors in name order, cut into consecutive shards of at most MAX_SHARD_BYTES."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    return shards


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _json(data: object) -> str:
    return json.dumps(data, sort_keys=True, indent=2) + "\n"


def size_report(model: nn.Module, plan: SplitPlan) -> dict:
    """Dense vs compressed FFN bytes, total bytes and average FFN bits of a compressed model."""
    modules = _split_modules(model)
    tensors, _ = _tensors_and_aliases(model)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    ffn = sum(module.nbytes() for _, module in modules.values())
    sizes = [layer.intermediate_size for layer in plan.layers]
    dense = dense_ffn_bytes(plan.geometry, sizes)
    planned = plan_ffn_bytes(plan)
    return {
        "ffn_bytes": ffn,
        "planned_ffn_bytes": sum(planned),
        "dense_ffn_bytes_fp16": dense,
        "ffn_size_fraction": ffn / dense,
        "average_ffn_bits": average_bits(plan),
        "total_bytes": total,
        "non_ffn_bytes": total - ffn,
        "layers": [
            {
                "layer": layer.layer,
                "n_heavy": layer.n_heavy,
                "n_light": layer.n_light,
                "n_pruned": len(layer.pruned_idx),
                "light": layer.light.label(),
                "heavy_dtype": layer.heavy_dtype,
                "bytes": planned[layer.layer],
            }
            for layer in plan.layers
        ],
    }


def save_compressed(
    model: nn.Module,
    tokenizer: object | None,
    plan: SplitPlan,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    extra: dict | None = None,
) -> Path:
    """Write a compressed model as a checkpoint folder (atomically); returns the folder.

    Refuses an existing `out_dir` unless `overwrite`. `extra` (JSON-able, e.g. the command's
    options) is kept in quantization_config["extra"].
    """
    out_dir = Path(out_dir)
    refuse_existing(out_dir, overwrite)
    modules = _split_modules(model)
    metas = [module.meta() for _, module in modules.values()]
    planned = plan_ffn_bytes(plan)
    stored = [module.nbytes() for _, module in modules.values()]
    heavy = [module.n_heavy for _, module in modules.values()]
    if stored != planned or heavy != [layer.n_heavy for layer in plan.layers]:
        raise FFNSplitError(
            "the model's SplitFFNs do not match the plan (sizes or heavy counts differ): save the "
            "model with the plan it was compressed with"
        )
    report = size_report(model, plan)
    tensors, aliases = _tensors_and_aliases(model)
    shards = _shards(tensors)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    # The loader builds the skeleton in the config's dtype: record the one the dense tensors
    # really have (a model cast after loading keeps its original dtype in the config).
    embeddings = model.get_input_embeddings()
    if embeddings is not None and embeddings.weight.is_floating_point():
        stored = str(embeddings.weight.dtype).removeprefix("torch.")
        config["dtype"] = stored
        if "torch_dtype" in config:
            config["torch_dtype"] = stored
    if not config.get("architectures"):
        config["architectures"] = [type(model).__name__]
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        from safetensors.torch import save_file

        names = (
            [WEIGHTS_NAME]
            if len(shards) == 1
            else [
                f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
            ]
        )
        for name, shard in zip(names, shards, strict=True):
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": report["total_bytes"]},
                "weight_map": {key: n for n, s in zip(names, shards, strict=True) for key in s},
            }
            (tmp / INDEX_NAME).write_text(_json(index), encoding="utf-8")
        config["quantization_config"] = {
            "quant_method": QUANT_METHOD,
            "format_version": ffnsplit.FORMAT_VERSION,
            "ffnsplit_version": ffnsplit.__version__,
            "modules": {
                name: {**meta, "layer": layer}
                for (name, (layer, _)), meta in zip(modules.items(), metas, strict=True)
            },
            "aliases": aliases,
            "files": {name: _sha256(tmp / name) for name in names},
            "extra": extra or {},
        }
        (tmp / "config.json").write_text(_json(config), encoding="utf-8")
        (tmp / "plan.json").write_text(plan.to_json(), encoding="utf-8")
        (tmp / "size_report.json").write_text(_json(report), encoding="utf-8")
        if tokenizer is not None and not isinstance(tokenizer, MissingTokenizer):
            tokenizer.save_pretrained(str(tmp))
    return out_dir


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent} has no {path.name}: it is not a checkpoint") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{path} is not valid JSON ({first}): the {what} is corrupt"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object: the {what} is corrupt")
    return data


def is_compressed_dir(path: str | os.PathLike) -> bool:
    """True when `path` is a folder whose config.json names ffnsplit as its quant method."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    quant = data.get("quantization_config") if isinstance(data, dict) else None
    return isinstance(quant, dict) and quant.get("quant_method") == QUANT_METHOD


def _quantization_config(config: dict, path: Path) -> dict:
    quant = config.get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(
            f"{path} is not an ffnsplit checkpoint (no quantization_config with quant_method "
            f"'{QUANT_METHOD}'): load it as an ordinary model"
        )
    version = quant.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{path}/config.json has no integer format_version: it is corrupt")
    if version > ffnsplit.FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by ffnsplit format {version}, this ffnsplit "
            f"({ffnsplit.__version__}) reads <= {ffnsplit.FORMAT_VERSION}: upgrade ffnsplit"
        )
    for key, kind in (("modules", dict), ("aliases", dict), ("files", dict)):
        if not isinstance(quant.get(key), kind):
            raise CheckpointError(f"{path}/config.json lacks quantization_config.{key}: corrupt")
    return quant


def _skeleton(config_dict: dict, quant: dict, path: Path) -> nn.Module:
    """The architecture with parameters on the meta device and SplitFFN skeletons installed."""
    import transformers
    from accelerate import init_empty_weights

    architectures = config_dict.get("architectures") or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if not (
        isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)
    ):
        raise CheckpointError(
            f"{path}/config.json names architecture {architectures[:1]} that transformers "
            f"{transformers.__version__} does not provide: upgrade transformers"
        )
    plain = {k: v for k, v in config_dict.items() if k != "quantization_config"}
    try:
        config = transformers.AutoConfig.for_model(**plain)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}/config.json is not a valid model config ({exc})") from None
    # Non-persistent buffers (rotary frequencies, ...) are not in the checkpoint: they are
    # computed for real while the parameters stay on the meta device.
    with init_empty_weights(include_buffers=False):
        model = model_class._from_config(config)
    blocks = get_ffn_blocks(model)
    by_layer = {}
    for name, meta in quant["modules"].items():
        if not isinstance(meta, dict) or not isinstance(meta.get("layer"), int):
            raise CheckpointError(f"{path}/config.json: module {name} has no layer: corrupt")
        by_layer[meta["layer"]] = (name, meta)
    if sorted(by_layer) != list(range(len(blocks))):
        raise CheckpointError(
            f"{path} describes SplitFFNs for layers {sorted(by_layer)}, the architecture has "
            f"{len(blocks)} FFN layers: the checkpoint is corrupt"
        )
    for block in blocks:
        name, meta = by_layer[block.layer]
        skeleton = SplitFFN.from_meta({k: v for k, v in meta.items() if k != "layer"})
        block.install(skeleton)
    placed = {n for n, m in model.named_modules() if isinstance(m, SplitFFN)}
    if placed != set(quant["modules"]):
        raise CheckpointError(
            f"{path}: SplitFFN module names {sorted(quant['modules'])[:2]}... do not match the "
            "architecture: the checkpoint is corrupt"
        )
    return model


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path} is truncated or corrupt ({why}): compress the model again")


def _read_header(path: Path) -> dict[str, dict]:
    """Parse and check a safetensors header against the file size, before reading any tensor."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, "no header")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(size - 8, _MAX_HEADER_BYTES):
                raise _corrupt(path, f"header of {length} bytes in a {size}-byte file")
            header = json.loads(handle.read(length))
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError):
        raise _corrupt(path, "header is not JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - length
    end_max = 0
    for name, info in header.items():
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"bad entry for {name}") from None
        numel = 1
        for dim in shape:
            if dim < 0:
                raise _corrupt(path, f"negative dimension in {name}")
            numel *= dim
        if not 0 <= start <= end <= data_size or end - start != numel * dtype.itemsize:
            raise _corrupt(path, f"{name} lies outside the file")
        end_max = max(end_max, end)
        info["torch_dtype"], info["shape"] = dtype, shape
    if end_max != data_size:
        raise _corrupt(path, f"data ends at {end_max} of {data_size} bytes")
    return header


def _check_file(path: Path, expected: str) -> None:
    if _sha256(path) != expected:
        raise _corrupt(path, "sha256 mismatch")


def load_compressed(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[nn.Module, object]:
    """(model in eval mode with SplitFFN modules, tokenizer) from a checkpoint folder.

    A folder saved without a tokenizer gives a MissingTokenizer: the model is usable (info, bench)
    and the first use of the tokenizer raises a CheckpointError that says what to do.

    `dtype` casts the dense tensors (heavy weights, biases, non-FFN parameters); packed
    quantized weights and their scales keep their stored format.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint folder at {path}: check the path")
    config = _read_json(path / "config.json", "checkpoint config")
    quant = _quantization_config(config, path)
    model = _skeleton(config, quant, path)
    expected = model.state_dict(keep_vars=True)
    aliases = quant["aliases"]
    stored = {name: t for name, t in expected.items() if name not in aliases}
    files = sorted(quant["files"])
    if not files or any(
        Path(name).name != name or not name.endswith(".safetensors") for name in files
    ):
        raise CheckpointError(f"{path}/config.json lists unexpected tensor files {files}: corrupt")

    headers = {}
    for name in files:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path} lacks {name}: the checkpoint is incomplete")
        headers[name] = _read_header(file)
    found = {key: name for name, header in headers.items() for key in header}
    for key, tensor in stored.items():
        if key not in found:
            raise CheckpointError(f"{path} lacks tensor {key}: the checkpoint is incomplete")
        info = headers[found[key]][key]
        if info["torch_dtype"] != tensor.dtype or info["shape"] != list(tensor.shape):
            raise CheckpointError(
                f"{path}: tensor {key} is {info['torch_dtype']} {info['shape']}, the architecture "
                f"expects {tensor.dtype} {list(tensor.shape)}: the checkpoint is corrupt"
            )
    unexpected = sorted(set(found) - set(stored))
    if unexpected:
        raise CheckpointError(f"{path} has unexpected tensor {unexpected[0]}: it is corrupt")
    for name in files:
        _check_file(path / name, quant["files"][name])

    state: dict[str, Tensor] = {}
    device = torch.device(device)
    for name in files:
        with safe_open(str(path / name), framework="pt", device=str(device)) as handle:
            for key in headers[name]:
                state[key] = handle.get_tensor(key)
    for alias, target in aliases.items():
        if target not in state or alias not in expected:
            raise CheckpointError(f"{path}: alias {alias} -> {target} is unknown: corrupt")
        state[alias] = state[target]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.to(device)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"{path}: {leftover[0]} was not loaded: the checkpoint is incomplete")
    if dtype is not None:
        _cast_dense(model, dtype)
    return model.eval(), _load_tokenizer(path)


def _cast_dense(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters and buffers to `dtype`, except packed quantized weights."""
    for module in model.modules():
        if isinstance(module, PackedWeight):
            continue
        for _name, param in module.named_parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(dtype)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.is_floating_point():
                setattr(module, name, buffer.to(dtype))


class MissingTokenizer:
    """Stands in for the tokenizer of a checkpoint folder that has none: any use of it (calling
    it, reading an attribute, len) raises one CheckpointError naming the folder and the fix."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self) -> CheckpointError:
        return CheckpointError(
            f"{self.path} has no tokenizer (no tokenizer.json or tokenizer_config.json): copy the "
            "tokenizer files of the model it was compressed from into it"
        )

    def __getattr__(self, name: str) -> object:
        if name.startswith("__"):  # protocol probes (copy, pickle, numpy) see a plain object
            raise AttributeError(name)
        raise self.error()

    def __call__(self, *args: object, **kwargs: object) -> object:
        raise self.error()

    def __len__(self) -> int:
        raise self.error()

    def __bool__(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"MissingTokenizer({str(self.path)!r})"


def _load_tokenizer(path: Path) -> object:
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return MissingTokenizer(path)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path} has an unusable tokenizer ({first[:200]})") from None
