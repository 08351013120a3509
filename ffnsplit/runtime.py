"""Device and dtype choices shared by every command, with one-line errors for impossible ones."""

from __future__ import annotations

import torch

from ffnsplit.errors import OptionError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(name: str | None) -> torch.device:
    """`auto` / None -> cuda when available else cpu; `cuda` without a GPU is a clear error."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise OptionError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(
                f"--device {name} was asked for but no CUDA GPU is visible: use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise OptionError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
    elif device.type != "cpu":
        raise OptionError(f"unsupported device {name!r}: use cpu, cuda or cuda:N")
    return device


def resolve_dtype(name: str | None) -> torch.dtype | None:
    """None / `auto` keeps the model's stored dtype."""
    if name in (None, "", "auto"):
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise OptionError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA and CPU allocation failures."""
    if isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
