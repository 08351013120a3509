"""SplitFFN: an FFN as a heavy branch (dense, or int8) plus a compressed light branch.

Neurons are ordered [heavy | light] (pruned neurons are gone). The quantized case is one call to
`kernels.ops.split_ffn` (Triton on GPU, torch reference elsewhere); a low-rank light branch runs
as plain torch matmuls beside it. Every tensor is a persistent buffer with a stable name, so
`state_dict()` is the checkpoint and `from_meta` rebuilds an empty skeleton (meta device) with the
same names, shapes and dtypes for `load_state_dict(assign=True)`.

State-dict keys under the module: `heavy_up`, `heavy_gate`, `heavy_down`, `up_bias`, `gate_bias`,
`down_bias`; `light_{up,gate,down}.plane{i}`, `.scales`, `.zeros` (packed quantized light part);
`lowrank_{up,gate,down}.lowrank_a`, `.lowrank_b`, `light_up_bias`, `light_gate_bias` (low-rank
light part); `qheavy_{up,gate,down}.plane0`, `.scales`, `qheavy_up_bias`, `qheavy_gate_bias`
(int8 heavy part, a second split-FFN tier).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from ffnsplit import graphs
from ffnsplit.arch import ACTIVATIONS, apply_activation
from ffnsplit.compress.lowrank import LowRank
from ffnsplit.errors import CheckpointError
from ffnsplit.kernels.format import (
    HEAVY_MULTIPLE,
    PLANES,
    QuantizedWeight,
    SplitFFNWeights,
    n_groups,
    pad_heavy,
)
from ffnsplit.kernels.ops import split_ffn

MODULE_FORMAT = "splitffn"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
LIGHT_KINDS = ("quant", "lowrank", "none")
HEAVY_KINDS = ("dense", "int8", "none")
LIGHT_ACTS = ("none", "int8")  # the light part's activations: as they are, or int8 per row


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


@dataclass
class QuantizedHeavy:
    """A heavy part stored int8 per channel (h padded with zero neurons to a multiple of 32)."""

    up: QuantizedWeight  # [hp, H]
    gate: QuantizedWeight | None  # [hp, H]
    down: QuantizedWeight  # [H, hp]
    up_bias: Tensor | None = None  # [hp]
    gate_bias: Tensor | None = None  # [hp]


_PARTS = ("up", "gate", "down")
_BIASES = ("up_bias", "gate_bias", "down_bias", "light_up_bias", "light_gate_bias")
_BIASES += ("qheavy_up_bias", "qheavy_gate_bias")


class SplitFFN(nn.Module):
    """x [..., H] -> y [..., H] (in x's dtype): heavy neurons kept nearly exact + light neurons
    compressed hard.

    `weights` holds the dense heavy part, an optional quantized light part and their biases (for
    h + l neurons, l padded to a multiple of 32). `lowrank` is an alternative light part kept as
    factors (exclusive with a quantized one). `quantized_heavy` replaces the dense heavy part by
    an int8 one, run as a second split-FFN tier whose output is added. `n_heavy` / `n_light` are
    the real (unpadded) neuron counts, kept for reports.
    """

    cuda_graphs: bool = graphs.ENABLED  # eager CUDA calls of few rows from CUDA graphs

    def __init__(
        self,
        weights: SplitFFNWeights,
        lowrank: LowRankLight | None = None,
        n_light: int | None = None,
        quantized_heavy: QuantizedHeavy | None = None,
        n_heavy: int | None = None,
    ) -> None:
        super().__init__()
        if weights.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {weights.activation!r}")
        if lowrank is not None and weights.light_up is not None:
            raise ValueError("a SplitFFN has a quantized or a low-rank light part, not both")
        if quantized_heavy is not None and weights.heavy_up is not None:
            raise ValueError("a SplitFFN has a dense or a quantized heavy part, not both")
        if all(p is None for p in (weights.heavy_up, weights.light_up, lowrank, quantized_heavy)):
            raise ValueError("a SplitFFN needs a heavy or a light part")
        self.activation = weights.activation
        self.gated = weights.gated
        if lowrank is not None:
            self.hidden_size = int(lowrank.down.shape[0])
        elif quantized_heavy is not None:
            self.hidden_size = int(quantized_heavy.down.shape[0])
        else:
            self.hidden_size = weights.hidden_size
        for name in ("heavy_up", "heavy_gate", "heavy_down", "up_bias", "gate_bias", "down_bias"):
            self.register_buffer(name, getattr(weights, name))
        for part in _PARTS:
            qw = getattr(weights, f"light_{part}")
            setattr(self, f"light_{part}", None if qw is None else PackedWeight(qw))
            qw = None if quantized_heavy is None else getattr(quantized_heavy, part)
            setattr(self, f"qheavy_{part}", None if qw is None else PackedWeight(qw))
            setattr(self, f"lowrank_{part}", None)
        self.light_kind = "quant" if weights.light_up is not None else "none"
        for name in ("light_up_bias", "light_gate_bias", "qheavy_up_bias", "qheavy_gate_bias"):
            self.register_buffer(name, None)
        if quantized_heavy is not None:
            self.qheavy_up_bias = quantized_heavy.up_bias
            self.qheavy_gate_bias = quantized_heavy.gate_bias
        if lowrank is not None:
            self.light_kind = "lowrank"
            self.lowrank_up = LowRankFactors(lowrank.up)
            self.lowrank_gate = None if lowrank.gate is None else LowRankFactors(lowrank.gate)
            self.lowrank_down = LowRankFactors(lowrank.down)
            self.light_up_bias = lowrank.up_bias
            self.light_gate_bias = lowrank.gate_bias
        stored_light = weights.n_light if lowrank is None else int(lowrank.up.shape[0])
        self.n_light = stored_light if n_light is None else int(n_light)
        stored_heavy = weights.n_heavy
        if quantized_heavy is not None:
            stored_heavy = int(quantized_heavy.up.shape[0])
        self.n_heavy = stored_heavy if n_heavy is None else int(n_heavy)
        self._dense_cache: tuple[torch.dtype, SplitFFNWeights] | None = None
        # "int8": the light part's activations quantized per row to int8 (kernels/w4a8.py); set
        # through `set_light_act`, which checks that the format allows it
        self.light_act = "none"

    @property
    def heavy_kind(self) -> str:
        if self.qheavy_up is not None:
            return "int8"
        return "dense" if self.heavy_up is not None else "none"

    def split_weights(self) -> SplitFFNWeights:
        """The dense heavy and quantized light tensors as the kernels take them (no copies)."""

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

    def _tiers(self) -> list[SplitFFNWeights]:
        """The split-FFN calls whose outputs add up to the FFN (low-rank part aside); the down
        bias goes with the first."""
        tiers = []
        if self.heavy_up is not None or self.light_up is not None:
            tiers.append(replace(self._padded_split(), down_bias=None))
        if self.qheavy_up is not None:
            gate = None if self.qheavy_gate is None else self.qheavy_gate.weight()
            tiers.append(
                SplitFFNWeights(
                    activation=self.activation,
                    gated=self.gated,
                    light_up=self.qheavy_up.weight(),
                    light_gate=gate,
                    light_down=self.qheavy_down.weight(),
                    up_bias=self.qheavy_up_bias,
                    gate_bias=self.qheavy_gate_bias,
                )
            )
        if tiers:
            tiers[0] = replace(tiers[0], down_bias=self.down_bias)
        return tiers

    def _apply(self, fn, recurse: bool = True):
        self._dense_cache = None  # moved or cast: the dequantized copy is stale
        self.__dict__.pop("_w4a8_cache", None)
        self.__dict__.pop("_padded", None)
        self._clear_graphs()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        # new values: the dequantized copy is stale, and so are the padded biases (the padded
        # heavy weights are the buffers' storage: a load copies into them), with any graph that
        # read them. Recorded graphs are not stale otherwise: a load copies into the same
        # tensors; one with assign=True (or swapped tensors) puts new tensors in place, which
        # __setattr__ or the address check at the next replay catches
        self._dense_cache = None
        self.__dict__.pop("_w4a8_cache", None)
        if self.__dict__.pop("_padded", None) is not None:
            self._clear_graphs()
        super()._load_from_state_dict(*args, **kwargs)

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if not name.startswith("_"):  # a tensor or part reassigned: recorded graphs are stale
            self.__dict__.pop("_padded", None)
            self.__dict__.pop("_w4a8_cache", None)
            self._clear_graphs()

    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        # CUDA graphs are not copied or pickled; nor the padded layout (rebuilt on first use)
        return {**state, "_graphs": None, "_padded": None, "_w4a8_cache": None}

    def _pad_heavy(self) -> None:
        """Give the kernels a heavy part of a multiple of 8 neurons (format.pad_heavy: zero
        neurons appended) once per placement; the heavy buffers become views of the padded
        tensors (same values and shapes, no second copy), the padded biases are kept beside."""
        if not self._unpadded():
            return
        h = self.heavy_up.shape[0]
        w = pad_heavy(self.split_weights(), HEAVY_MULTIPLE)
        self.heavy_up = w.heavy_up[:h]  # reassignments: recorded graphs are dropped
        if w.heavy_gate is not None:
            self.heavy_gate = w.heavy_gate[:h]
        self.heavy_down = w.heavy_down[:, :h]
        self.__dict__["_padded"] = w

    def _unpadded(self) -> bool:
        """A dense heavy part whose count is not a multiple of 8 and not (or no longer) padded.
        Buffers replaced behind the module's back (an offloading hook that loads them before
        every call, as accelerate's does) drop the padded layout, which would otherwise hold a
        copy of the heavy part on the GPU between calls; after graphs.MAX_MOVES such moves the
        module stops padding, as its graphs stop recording."""
        heavy = self.heavy_up
        if heavy is None or heavy.shape[0] % HEAVY_MULTIPLE == 0 or self._padded_valid():
            return False
        if self.__dict__.pop("_padded", None) is not None:
            self.__dict__["_pad_moves"] = self.__dict__.get("_pad_moves", 0) + 1
        return self.__dict__.get("_pad_moves", 0) <= graphs.MAX_MOVES

    def _padded_valid(self) -> bool:
        padded = self.__dict__.get("_padded")
        if padded is None or self.heavy_up is None:
            return False
        pairs = [(padded.heavy_up, self.heavy_up), (padded.heavy_down, self.heavy_down)]
        if self.heavy_gate is not None:
            pairs.append((padded.heavy_gate, self.heavy_gate))
        return all(p is not None and p.data_ptr() == t.data_ptr() for p, t in pairs)

    def _padded_split(self) -> SplitFFNWeights:
        """split_weights() with the padded heavy part where the first CUDA call laid one out."""
        w = self.split_weights()
        if not self._padded_valid():
            return w
        p = self.__dict__["_padded"]
        return replace(w, heavy_up=p.heavy_up, heavy_gate=p.heavy_gate,
                       heavy_down=p.heavy_down, up_bias=p.up_bias,
                       gate_bias=p.gate_bias)  # fmt: skip

    def _clear_graphs(self) -> None:
        calls = self.__dict__.get("_graphs")
        if calls is not None:
            calls.clear()

    def _graph_tensors(self) -> list[Tensor]:
        """Every tensor the forward reads besides x (a recorded graph holds their addresses)."""
        return [t for m in self.modules() for t in m._buffers.values() if t is not None]

    def _dense_weights(self, dtype: torch.dtype) -> SplitFFNWeights:
        """Every tier as one dense FFN in `dtype`, built once (CPU path).

        The Triton kernels read the packed weights directly; the torch path would dequantize
        every light weight on every call, which makes CPU evaluation several times slower. A
        dense copy costs the memory of the uncompressed FFN, which the CPU path can afford.
        """
        cache = self._dense_cache
        if cache is not None and cache[0] == dtype:
            return cache[1]
        tiers = self._tiers()

        def joined(name: str, dim: int = 0) -> Tensor | None:
            parts = []
            for tier in tiers:
                for t in (getattr(tier, f"heavy_{name}"), getattr(tier, f"light_{name}")):
                    if isinstance(t, QuantizedWeight):
                        t = t.dequantize()
                    if t is not None:
                        parts.append(t.to(dtype))
            return torch.cat(parts, dim=dim) if parts else None

        def bias(name: str) -> Tensor | None:
            parts = [getattr(t, name) for t in tiers if getattr(t, name) is not None]
            return torch.cat(parts) if parts else None

        dense = SplitFFNWeights(
            activation=self.activation,
            gated=self.gated,
            heavy_up=joined("up"),
            heavy_gate=joined("gate"),
            heavy_down=joined("down", 1),
            up_bias=bias("up_bias"),
            gate_bias=bias("gate_bias"),
            down_bias=self.down_bias,
        )
        self._dense_cache = (dtype, dense)
        return dense

    def forward(self, x: Tensor) -> Tensor:
        """The FFN of x [..., H]. Eager CUDA calls of up to graphs.MAX_ROWS rows are replayed
        from CUDA graphs recorded on first use (ffnsplit/graphs.py: the kernels' launch costs
        more host time than their GPU time at decode sizes); `cuda_graphs = False` on the
        module or FFNSPLIT_CUDA_GRAPHS=0 turns that off."""
        # a heavy part of a multiple of 8 neurons for the kernels' 16-byte loads, once per
        # placement (before any graph is recorded here; never inside a caller's capture, whose
        # graph would redo the copy at every replay)
        if x.is_cuda and self._unpadded() and not torch.cuda.is_current_stream_capturing():
            self._pad_heavy()
        if x.is_cuda and self.cuda_graphs:
            calls = self.__dict__.get("_graphs")
            if calls is None:
                calls = self.__dict__["_graphs"] = graphs.GraphedCalls(
                    self._forward, self._graph_tensors
                )
            return calls(x)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        if self.light_act == "int8":
            return self._w4a8_forward(x)
        tiers = self._tiers()
        if tiers and not x.is_cuda:
            y = split_ffn(x, self._dense_weights(x.dtype))
        elif tiers:
            y = split_ffn(x, tiers[0])
            for tier in tiers[1:]:
                y = y + split_ffn(x, tier)
        else:
            y = torch.zeros(*x.shape[:-1], self.hidden_size, dtype=x.dtype, device=x.device)
            if self.down_bias is not None:
                y = y + self.down_bias.to(x.dtype)
        if self.lowrank_up is not None:
            y = y + self._lowrank_forward(x)
        return y

    def _w4a8_forward(self, x: Tensor) -> Tensor:
        """The FFN with int8 light activations: the W4A8 kernels on a GPU, their torch definition
        (light weights dequantized once, like the CPU path's dense copy) elsewhere."""
        from ffnsplit.kernels import w4a8

        (tier,) = self._tiers()
        if x.is_cuda:
            return w4a8.split_ffn(x, tier)
        cache = self.__dict__.get("_w4a8_cache")
        if cache is None:
            cache = self.__dict__["_w4a8_cache"] = w4a8.dequantized(tier)
        return w4a8.reference_split_ffn(x, cache)

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
        for name in ("heavy_up", *_BIASES):
            t = getattr(self, name)
            if t is not None:
                return t.dtype
        if self.lowrank_up is not None:
            return self.lowrank_up.lowrank_a.dtype
        return torch.float16

    def meta(self) -> dict:
        """JSON-able description from which `from_meta` rebuilds an empty skeleton."""
        light: dict = {}
        heavy: dict = {}
        for part in _PARTS:
            module = getattr(self, f"light_{part}") or getattr(self, f"lowrank_{part}")
            if module is not None:
                light[part] = module.meta()
            if getattr(self, f"qheavy_{part}") is not None:
                heavy[part] = getattr(self, f"qheavy_{part}").meta()
        return {
            "format": MODULE_FORMAT,
            "activation": self.activation,
            "gated": self.gated,
            "hidden_size": self.hidden_size,
            "n_heavy": self.n_heavy,
            "n_light": self.n_light,
            "heavy_kind": self.heavy_kind,
            "light_kind": self.light_kind,
            "dtype": _dtype_name(self._dtype()),
            "biases": {name: getattr(self, name) is not None for name in _BIASES},
            "heavy": heavy,
            "light": light,
            **({"light_act": self.light_act} if self.light_act != "none" else {}),
        }

    @classmethod
    def from_meta(cls, meta: dict, device: torch.device | str = "meta") -> SplitFFN:
        """An empty skeleton (uninitialised buffers on `device`) with the layout `meta` gives."""
        try:
            return cls._skeleton(meta, device)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(
                f"SplitFFN metadata is malformed ({type(exc).__name__}: {exc}): file is corrupt"
            ) from None

    @classmethod
    def _skeleton(cls, meta: dict, device: torch.device | str) -> SplitFFN:
        if meta.get("format") != MODULE_FORMAT:
            raise CheckpointError(f"module format {meta.get('format')!r} is not {MODULE_FORMAT!r}")
        kind, heavy_kind = meta["light_kind"], meta["heavy_kind"]
        if kind not in LIGHT_KINDS or heavy_kind not in HEAVY_KINDS:
            raise CheckpointError(
                f"SplitFFN metadata has heavy/light kinds {heavy_kind!r}/{kind!r}: file is corrupt"
            )
        dtype = _parse_dtype(meta["dtype"])
        hidden, heavy, gated = int(meta["hidden_size"]), int(meta["n_heavy"]), bool(meta["gated"])
        biases, light = meta["biases"], meta["light"]
        dense_heavy = heavy if heavy_kind == "dense" else 0

        def empty(*shape: int) -> Tensor:
            return torch.empty(*shape, dtype=dtype, device=device)

        def quantized(layout: dict, part: str) -> QuantizedWeight | None:
            if part not in layout:
                return None
            return PackedWeight.skeleton(layout[part], device).weight()

        light_up = quantized(light, "up") if kind == "quant" else None
        stored_light = 0 if light_up is None else light_up.shape[0]
        main = dense_heavy + stored_light
        weights = SplitFFNWeights(
            activation=str(meta["activation"]),
            gated=gated,
            heavy_up=empty(dense_heavy, hidden) if dense_heavy else None,
            heavy_gate=empty(dense_heavy, hidden) if dense_heavy and gated else None,
            heavy_down=empty(hidden, dense_heavy) if dense_heavy else None,
            light_up=light_up,
            light_gate=quantized(light, "gate") if kind == "quant" else None,
            light_down=quantized(light, "down") if kind == "quant" else None,
            up_bias=empty(main) if biases["up_bias"] else None,
            gate_bias=empty(main) if biases["gate_bias"] else None,
            down_bias=empty(hidden) if biases["down_bias"] else None,
        )
        quantized_heavy = None
        if heavy_kind == "int8":
            up = quantized(meta["heavy"], "up")
            quantized_heavy = QuantizedHeavy(
                up=up,
                gate=quantized(meta["heavy"], "gate"),
                down=quantized(meta["heavy"], "down"),
                up_bias=empty(up.shape[0]) if biases["qheavy_up_bias"] else None,
                gate_bias=empty(up.shape[0]) if biases["qheavy_gate_bias"] else None,
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
        module = cls(
            weights,
            lowrank=lowrank,
            n_light=int(meta["n_light"]),
            quantized_heavy=quantized_heavy,
            n_heavy=heavy,
        )
        act = meta.get("light_act", "none")
        if act not in LIGHT_ACTS or act != "none" and (kind != "quant" or heavy_kind == "int8"):
            raise CheckpointError(f"SplitFFN metadata has light activations {act!r} for a "
                                  f"{heavy_kind}/{kind} FFN: file is corrupt")  # fmt: skip
        module.light_act = act  # the format was checked by set_light_act before it was saved
        return module


def set_light_act(model: nn.Module, mode: str) -> int:
    """How every SplitFFN of `model` feeds its light part: "none" (x and a as they are) or
    "int8" (quantized per row to int8 for int8 tensor-core products: kernels/w4a8.py; it changes
    the numerics, `ffnsplit eval --light-act int8` measures by how much). Every FFN is checked
    before any is changed; returns how many were set."""
    from ffnsplit.errors import OptionError
    from ffnsplit.kernels import w4a8

    if mode not in LIGHT_ACTS:
        raise OptionError(
            f"unknown light activations {mode!r}: choose one of {', '.join(LIGHT_ACTS)}"
        )
    ffns = [m for m in model.modules() if isinstance(m, SplitFFN)]
    if mode != "none" and not ffns:
        raise OptionError(
            f"--light-act {mode} applies to a compressed model's split FFNs; this model has none"
        )
    for index, ffn in enumerate(ffns if mode != "none" else ()):
        if ffn.light_kind != "quant" or ffn.heavy_kind == "int8":
            why = f"its light part is {ffn.light_kind}, its heavy part {ffn.heavy_kind}"
        else:
            weights = (ffn.light_up, ffn.light_gate, ffn.light_down)
            why = next((r for p in weights if p is not None
                        and (r := w4a8.light_unsupported(p.weight()))), None)  # fmt: skip
        if why:
            raise OptionError(
                f"--light-act {mode} cannot run split FFN {index} ({why}): it needs a quantized "
                "light part with integer zero points and a dense heavy part; use --light-act none"
            )
    for ffn in ffns:
        ffn.light_act = mode
    return len(ffns)
