"""The Python API behind every CLI command: one call per command, no logic only the CLI has."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

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
    parameters: int  # FFN weights + biases (dense equivalent for split layers: stored elements)
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


def model_info(model: nn.Module) -> ModelInfo:
    """Per-FFN shapes, activation, dtype and sizes, and the model's totals."""
    from ffnsplit.arch import get_ffn_blocks
    from ffnsplit.modules import SplitFFN

    layers = []
    for block in get_ffn_blocks(model):
        split = block.module if isinstance(block.module, SplitFFN) else None
        if split is not None:
            count, nbytes = _tensor_bytes(split)
            layers.append(
                LayerInfo(
                    layer=block.layer,
                    name=block.name,
                    kind="split",
                    hidden_size=split.hidden_size,
                    intermediate_size=split.intermediate_size,
                    gated=split.gated,
                    activation=split.activation,
                    dtype=split.describe(),
                    parameters=count,
                    nbytes=nbytes,
                )
            )
            continue
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

    if tokens <= 0 or seq_len <= 1 or batch_size <= 0:
        raise OptionError("--tokens, --seq-len (> 1) and --batch-size must be positive")
    run_device = resolve_device(device)
    compute_dtype = resolve_dtype(dtype)
    load_device = "cpu" if sequential else run_device
    model, tokenizer = open_model(
        model_spec, device=load_device, dtype=compute_dtype, trust_remote_code=trust_remote_code
    )
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
    if out is not None:
        result.save(out)
    if plot is not None:
        plot_profile(result, plot)
    return result
