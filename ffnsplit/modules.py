"""SplitFFN: an FFN as a dense heavy branch plus a compressed light branch.

Neurons are ordered [heavy | light] (pruned neurons are gone). The quantized case is one call to
`kernels.ops.split_ffn` (Triton on GPU, torch reference elsewhere); a low-rank light branch runs
as plain torch matmuls beside it. Every tensor is a persistent buffer with a stable name, so
`state_dict()` is the checkpoint and `from_meta` rebuilds an empty skeleton (meta device) with the
same names, shapes and dtypes for `load_state_dict(assign=True)`.

State-dict keys under the module: `heavy_up`, `heavy_gate`, `heavy_down`, `up_bias`, `gate_bias`,
`down_bias`; `light_{up,gate,down}.plane{i}`, `.scales`, `.zeros` (packed quantized light part);
`lowrank_{up,gate,down}.lowrank_a`, `.lowrank_b`, `light_up_bias`, `light_gate_bias` (low-rank
light part).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ffnsplit.arch import ACTIVATIONS, apply_activation
from ffnsplit.compress.lowrank import LowRank
from ffnsplit.errors import CheckpointError
from ffnsplit.kernels.format import PLANES, QuantizedWeight, SplitFFNWeights, n_groups
from ffnsplit.kernels.ops import split_ffn

MODULE_FORMAT = "splitffn"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
LIGHT_KINDS = ("quant", "lowrank", "none")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_dtype(name: object) -> torch.dtype:
    if name not in _DTYPES:
        raise CheckpointError(f"SplitFFN metadata names an unknown dtype {name!r}: file is corrupt")
    return _DTYPES[name]


class PackedWeight(nn.Module):
    """The buffers of one `QuantizedWeight` (planes, scales, zeros) under stable names."""

    def __init__(self, qw: QuantizedWeight) -> None:
        super().__init__()
        for index, plane in enumerate(qw.planes):
            self.register_buffer(f"plane{index}", plane)
        self.register_buffer("scales", qw.scales)
        self.register_buffer("zeros", qw.zeros)
        self.bits = qw.bits
        self.group_size = qw.group_size
        self.shape = qw.shape

    def weight(self) -> QuantizedWeight:
        return QuantizedWeight(
            planes=[getattr(self, f"plane{i}") for i in range(len(PLANES[self.bits]))],
            scales=self.scales,
            zeros=self.zeros,
            bits=self.bits,
            group_size=self.group_size,
            shape=self.shape,
        )

    def meta(self) -> dict:
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "shape": list(self.shape),
            "symmetric": self.zeros is None,
            "scale_dtype": _dtype_name(self.scales.dtype),
        }

    @classmethod
    def skeleton(cls, meta: dict, device: torch.device | str) -> PackedWeight:
        """Empty buffers of the shapes and dtypes `meta` describes."""
        bits, group, (n, k) = int(meta["bits"]), int(meta["group_size"]), meta["shape"]
        if bits not in PLANES:
            raise CheckpointError(f"SplitFFN metadata has bit width {bits}: file is corrupt")
        scale_dtype = _parse_dtype(meta["scale_dtype"])
        groups = n_groups(int(k), group)
        scales = torch.empty(groups, int(n), dtype=scale_dtype, device=device)
        planes = [
            torch.empty(int(k) * width // 32, int(n), dtype=torch.int32, device=device)
            for width in PLANES[bits]
        ]
        zeros = None if meta["symmetric"] else torch.empty_like(scales)
        qw = QuantizedWeight(planes, scales, zeros, bits=bits, group_size=group, shape=(n, k))
        return cls(qw)


class LowRankFactors(nn.Module):
    """The buffers of one `LowRank` factorization (W ~ a @ b) under stable names."""

    def __init__(self, factors: LowRank) -> None:
        super().__init__()
        self.register_buffer("lowrank_a", factors.a)
        self.register_buffer("lowrank_b", factors.b)

    def factors(self) -> LowRank:
        return LowRank(a=self.lowrank_a, b=self.lowrank_b)

    def meta(self) -> dict:
        return self.factors().meta()

    @classmethod
    def skeleton(cls, meta: dict, dtype: torch.dtype, device: torch.device | str) -> LowRankFactors:
        (n, k), rank = meta["shape"], int(meta["rank"])
        a = torch.empty(int(n), rank, dtype=dtype, device=device)
        b = torch.empty(rank, int(k), dtype=dtype, device=device)
        return cls(LowRank(a=a, b=b))


@dataclass
class LowRankLight:
    """A low-rank light part: factors of the light rows of up/gate and columns of down."""

    up: LowRank  # [l, H]
    gate: LowRank | None  # [l, H]
    down: LowRank  # [H, l]
    up_bias: Tensor | None = None  # [l]
    gate_bias: Tensor | None = None  # [l]


class SplitFFN(nn.Module):
    """x [..., H] -> y [..., H] (in x's dtype): heavy dense neurons + light compressed neurons.

    `weights` holds the heavy part, an optional quantized light part and the biases (for h + l
    neurons, l padded to a multiple of 32). `lowrank` is an alternative light part kept as
    factors; it and a quantized light part are exclusive. `n_light` is the number of real
    (unpadded) light neurons, kept for reports.
    """

    def __init__(
        self,
        weights: SplitFFNWeights,
        lowrank: LowRankLight | None = None,
        n_light: int | None = None,
    ) -> None:
        super().__init__()
        if weights.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {weights.activation!r}")
        if lowrank is not None and weights.light_up is not None:
            raise ValueError("a SplitFFN has a quantized or a low-rank light part, not both")
        if weights.heavy_up is None and weights.light_up is None and lowrank is None:
            raise ValueError("a SplitFFN needs a heavy or a light part")
        self.activation = weights.activation
        self.gated = weights.gated
        self.hidden_size = (
            int(lowrank.down.shape[0]) if lowrank is not None else weights.hidden_size
        )
        for name in ("heavy_up", "heavy_gate", "heavy_down", "up_bias", "gate_bias", "down_bias"):
            self.register_buffer(name, getattr(weights, name))
        for name in ("light_up", "light_gate", "light_down"):
            qw = getattr(weights, name)
            setattr(self, name, None if qw is None else PackedWeight(qw))
        self.light_kind = "quant" if weights.light_up is not None else "none"
        self.lowrank_up = self.lowrank_gate = self.lowrank_down = None
        self.register_buffer("light_up_bias", None)
        self.register_buffer("light_gate_bias", None)
        if lowrank is not None:
            self.light_kind = "lowrank"
            self.lowrank_up = LowRankFactors(lowrank.up)
            self.lowrank_gate = None if lowrank.gate is None else LowRankFactors(lowrank.gate)
            self.lowrank_down = LowRankFactors(lowrank.down)
            self.light_up_bias = lowrank.up_bias
            self.light_gate_bias = lowrank.gate_bias
        stored_light = weights.n_light if lowrank is None else int(lowrank.up.shape[0])
        self.n_light = stored_light if n_light is None else int(n_light)

    @property
    def n_heavy(self) -> int:
        return 0 if self.heavy_up is None else int(self.heavy_up.shape[0])

    def split_weights(self) -> SplitFFNWeights:
        """The heavy and quantized light tensors as the kernels take them (no copies)."""

        def packed(module: PackedWeight | None) -> QuantizedWeight | None:
            return None if module is None else module.weight()

        return SplitFFNWeights(
            activation=self.activation,
            gated=self.gated,
            heavy_up=self.heavy_up,
            heavy_gate=self.heavy_gate,
            heavy_down=self.heavy_down,
            light_up=packed(self.light_up),
            light_gate=packed(self.light_gate),
            light_down=packed(self.light_down),
            up_bias=self.up_bias,
            gate_bias=self.gate_bias,
            down_bias=self.down_bias,
        )

    def _apply(self, fn, recurse: bool = True):
        self._dense_cache = None  # moved or cast: the dequantized copy is stale
        return super()._apply(fn, recurse)

    def _dense_weights(self, dtype: torch.dtype) -> SplitFFNWeights:
        """Heavy and light weights as one dense FFN in `dtype`, built once (CPU path).

        The Triton kernels read the packed weights directly; the torch path would dequantize
        every light weight on every call, which makes CPU evaluation several times slower. A
        dense copy costs the memory of the uncompressed FFN, which the CPU path can afford.
        """
        cache = getattr(self, "_dense_cache", None)
        if cache is not None and cache[0] == dtype:
            return cache[1]
        w = self.split_weights()

        def joined(heavy: Tensor | None, light: QuantizedWeight | None, dim: int) -> Tensor | None:
            parts = [
                t for t in (heavy, None if light is None else light.dequantize()) if t is not None
            ]
            return None if not parts else torch.cat([t.to(dtype) for t in parts], dim=dim)

        dense = SplitFFNWeights(
            activation=w.activation,
            gated=w.gated,
            heavy_up=joined(w.heavy_up, w.light_up, 0),
            heavy_gate=joined(w.heavy_gate, w.light_gate, 0),
            heavy_down=joined(w.heavy_down, w.light_down, 1),
            up_bias=w.up_bias,
            gate_bias=w.gate_bias,
            down_bias=w.down_bias,
        )
        self._dense_cache = (dtype, dense)
        return dense

    def forward(self, x: Tensor) -> Tensor:
        if (self.heavy_up is not None or self.light_up is not None) and not x.is_cuda:
            y = split_ffn(x, self._dense_weights(x.dtype))
        elif self.heavy_up is not None or self.light_up is not None:
            y = split_ffn(x, self.split_weights())
        else:
            y = torch.zeros(*x.shape[:-1], self.hidden_size, dtype=x.dtype, device=x.device)
            if self.down_bias is not None:
                y = y + self.down_bias.to(x.dtype)
        if self.lowrank_up is not None:
            y = y + self._lowrank_forward(x)
        return y

    def _lowrank_forward(self, x: Tensor) -> Tensor:
        up = self.lowrank_up.factors().apply(x)
        if self.light_up_bias is not None:
            up = up + self.light_up_bias.to(x.dtype)
        if self.lowrank_gate is None:
            hidden = apply_activation(self.activation, up)
        else:
            gate = self.lowrank_gate.factors().apply(x)
            if self.light_gate_bias is not None:
                gate = gate + self.light_gate_bias.to(x.dtype)
            hidden = apply_activation(self.activation, gate) * up
        return self.lowrank_down.factors().apply(hidden)

    def nbytes(self) -> int:
        """Bytes of every stored tensor (what the checkpoint holds for this FFN)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def _dtype(self) -> torch.dtype:
        """The dtype of the dense tensors (heavy weights, biases, low-rank factors)."""
        for name in ("heavy_up", "up_bias", "down_bias", "light_up_bias"):
            t = getattr(self, name)
            if t is not None:
                return t.dtype
        if self.lowrank_up is not None:
            return self.lowrank_up.lowrank_a.dtype
        return torch.float16

    def meta(self) -> dict:
        """JSON-able description from which `from_meta` rebuilds an empty skeleton."""
        light: dict = {}
        for part in ("up", "gate", "down"):
            module = getattr(self, f"light_{part}")
            if module is None:
                module = getattr(self, f"lowrank_{part}")
            if module is not None:
                light[part] = module.meta()
        return {
            "format": MODULE_FORMAT,
            "activation": self.activation,
            "gated": self.gated,
            "hidden_size": self.hidden_size,
            "n_heavy": self.n_heavy,
            "n_light": self.n_light,
            "light_kind": self.light_kind,
            "dtype": _dtype_name(self._dtype()),
            "biases": {
                name: getattr(self, name) is not None
                for name in (
                    "up_bias",
                    "gate_bias",
                    "down_bias",
                    "light_up_bias",
                    "light_gate_bias",
                )
            },
            "light": light,
        }

    @classmethod
    def from_meta(cls, meta: dict, device: torch.device | str = "meta") -> SplitFFN:
        """An empty skeleton (uninitialised buffers on `device`) with the layout `meta` gives."""
        try:
            return cls._skeleton(meta, device)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"SplitFFN metadata is malformed ({type(exc).__name__}: {exc}): file is corrupt"
            ) from None

    @classmethod
    def _skeleton(cls, meta: dict, device: torch.device | str) -> SplitFFN:
        if meta.get("format") != MODULE_FORMAT:
            raise CheckpointError(f"module format {meta.get('format')!r} is not {MODULE_FORMAT!r}")
        kind = meta["light_kind"]
        if kind not in LIGHT_KINDS:
            raise CheckpointError(f"SplitFFN metadata has light kind {kind!r}: file is corrupt")
        dtype = _parse_dtype(meta["dtype"])
        hidden, heavy, gated = int(meta["hidden_size"]), int(meta["n_heavy"]), bool(meta["gated"])
        biases, light = meta["biases"], meta["light"]

        def empty(*shape: int) -> Tensor:
            return torch.empty(*shape, dtype=dtype, device=device)

        def quantized(part: str) -> QuantizedWeight | None:
            if kind != "quant" or part not in light:
                return None
            return PackedWeight.skeleton(light[part], device).weight()

        light_up = quantized("up")
        stored_light = 0 if light_up is None else light_up.shape[0]
        weights = SplitFFNWeights(
            activation=str(meta["activation"]),
            gated=gated,
            heavy_up=empty(heavy, hidden) if heavy else None,
            heavy_gate=empty(heavy, hidden) if heavy and gated else None,
            heavy_down=empty(hidden, heavy) if heavy else None,
            light_up=light_up,
            light_gate=quantized("gate"),
            light_down=quantized("down"),
            up_bias=empty(heavy + stored_light) if biases["up_bias"] else None,
            gate_bias=empty(heavy + stored_light) if biases["gate_bias"] else None,
            down_bias=empty(hidden) if biases["down_bias"] else None,
        )
        lowrank = None
        if kind == "lowrank":

            def factors(part: str) -> LowRank | None:
                if part not in light:
                    return None
                return LowRankFactors.skeleton(light[part], dtype, device).factors()

            up = factors("up")
            lowrank = LowRankLight(
                up=up,
                gate=factors("gate"),
                down=factors("down"),
                up_bias=empty(up.shape[0]) if biases["light_up_bias"] else None,
                gate_bias=empty(up.shape[0]) if biases["light_gate_bias"] else None,
            )
        return cls(weights, lowrank=lowrank, n_light=int(meta["n_light"]))
