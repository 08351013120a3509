"""The packed weight format shared by the quantizers, the kernels and the checkpoint files.

A weight W [N, K] (nn.Linear orientation, y = x W^T) is quantized along K in groups of
`group_size` consecutive input features; the last group may be partial. Codes q lie in
[0, 2^bits - 1] and are stored as power-of-two *bit planes* (3 bits = a 2-bit plane plus a 1-bit
plane), so no code ever straddles a 32-bit word. A plane of width b packs 32 // b consecutive k of
one output column into one int32 word, element j at bits [j*b, (j+1)*b). Planes are K-major
([K * b // 32, N]) so that consecutive output columns are consecutive in memory (coalesced loads).

Dequantization: asymmetric w = (q - zero) * scale; symmetric w = (q - 2^(bits-1)) * scale.
Only torch is imported here: this module is the bottom of the dependency graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

PLANES: dict[int, tuple[int, ...]] = {8: (8,), 4: (4,), 3: (2, 1), 2: (2,)}
SUPPORTED_BITS = tuple(sorted(PLANES))
PACK_ALIGN = 32  # K must be a multiple of this (the 1-bit plane packs 32 codes per word)


def plane_offsets(bits: int) -> tuple[int, ...]:
    """Bit offset of each plane inside a code: (0,) or (0, 2) for 3 bits."""
    offsets, total = [], 0
    for width in PLANES[bits]:
        offsets.append(total)
        total += width
    return tuple(offsets)


def n_groups(k: int, group_size: int) -> int:
    return -(-k // group_size)


def _check_bits(bits: int) -> None:
    if bits not in PLANES:
        raise ValueError(f"unsupported bit width {bits}: choose one of {SUPPORTED_BITS}")


def pack_planes(q: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """Pack codes q (integer tensor [N, K], values in [0, 2^bits)) into int32 planes [K*b/32, N]."""
    _check_bits(bits)
    n, k = q.shape
    if k % PACK_ALIGN:
        raise ValueError(f"K={k} is not a multiple of {PACK_ALIGN}")
    codes = q.to(torch.int64).t().contiguous()  # [K, N]
    planes = []
    for width, offset in zip(PLANES[bits], plane_offsets(bits), strict=True):
        per_word = 32 // width
        part = (codes >> offset) & ((1 << width) - 1)
        part = part.view(k // per_word, per_word, n)
        shifts = torch.arange(per_word, dtype=torch.int64, device=q.device) * width
        words = (part << shifts.view(1, per_word, 1)).sum(dim=1)  # fits in 32 unsigned bits
        words = torch.where(words >= 2**31, words - 2**32, words)
        planes.append(words.to(torch.int32).contiguous())
    return planes


def unpack_planes(planes: list[torch.Tensor], bits: int, k: int) -> torch.Tensor:
    """Inverse of pack_planes: int32 planes -> codes [N, K] as uint8."""
    _check_bits(bits)
    codes = None
    for plane, width, offset in zip(planes, PLANES[bits], plane_offsets(bits), strict=True):
        per_word = 32 // width
        words = plane.to(torch.int64) & 0xFFFFFFFF  # [K/per_word, N]
        shifts = torch.arange(per_word, dtype=torch.int64, device=plane.device) * width
        part = (words.unsqueeze(1) >> shifts.view(1, per_word, 1)) & ((1 << width) - 1)
        part = part.reshape(k, -1) << offset
        codes = part if codes is None else codes | part
    return codes.t().to(torch.uint8).contiguous()


@dataclass
class QuantizedWeight:
    """A group-quantized weight [N, K] in the packed bit-plane format (see module docstring)."""

    planes: list[torch.Tensor]
    scales: torch.Tensor  # [n_groups, N]
    zeros: torch.Tensor | None  # [n_groups, N]; None means symmetric
    bits: int
    group_size: int
    shape: tuple[int, int] = field(default=(0, 0))  # (N, K)

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        n, k = self.shape
        if (
            k % PACK_ALIGN
            or self.group_size <= 0
            or (self.group_size % PACK_ALIGN and self.group_size < k)
        ):
            raise ValueError(
                f"bad quantized shape K={k}, group_size={self.group_size}: K must be a multiple "
                f"of {PACK_ALIGN} and the group size a multiple of {PACK_ALIGN}"
            )
        if len(self.planes) != len(PLANES[self.bits]):
            raise ValueError(f"{self.bits}-bit weight needs {len(PLANES[self.bits])} planes")
        for plane, width in zip(self.planes, PLANES[self.bits], strict=True):
            if plane.dtype != torch.int32 or tuple(plane.shape) != (k * width // 32, n):
                raise ValueError(
                    f"plane of width {width} must be int32 {(k * width // 32, n)}, "
                    f"got {plane.dtype} {tuple(plane.shape)}"
                )
        groups = n_groups(k, self.group_size)
        if tuple(self.scales.shape) != (groups, n):
            raise ValueError(f"scales must be {(groups, n)}, got {tuple(self.scales.shape)}")
        if self.zeros is not None and tuple(self.zeros.shape) != (groups, n):
            raise ValueError(f"zeros must be {(groups, n)}, got {tuple(self.zeros.shape)}")

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def device(self) -> torch.device:
        return self.scales.device

    def codes(self) -> torch.Tensor:
        """The integer codes q [N, K] (uint8)."""
        return unpack_planes(self.planes, self.bits, self.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [N, K] this format represents."""
        n, k = self.shape
        q = self.codes().to(torch.float32)
        scales = self.scales.to(torch.float32).t().repeat_interleave(self.group_size, dim=1)[:, :k]
        if self.zeros is None:
            zeros = float(2 ** (self.bits - 1))
        else:
            zeros = self.zeros.to(torch.float32).t().repeat_interleave(self.group_size, dim=1)
            zeros = zeros[:, :k]
        return ((q - zeros) * scales).to(dtype)

    def kernel_args(self) -> list[torch.Tensor]:
        """The four tensors the Triton kernels take for this weight: plane 0, plane 1 (plane 0
        again when there is one plane), scales, zeros (the scales again when symmetric: never
        read then, but typed like a pointer)."""
        p0 = self.planes[0]
        p1 = self.planes[1] if len(self.planes) > 1 else p0
        return [p0, p1, self.scales, self.scales if self.zeros is None else self.zeros]

    def nbytes(self) -> int:
        total = sum(p.numel() * p.element_size() for p in self.planes)
        total += self.scales.numel() * self.scales.element_size()
        if self.zeros is not None:
            total += self.zeros.numel() * self.zeros.element_size()
        return total

    def to(self, device: torch.device | str | None = None, scale_dtype: torch.dtype | None = None):
        """A copy on `device`, with scales/zeros cast to `scale_dtype` when given."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=scale_dtype or t.dtype)

        return QuantizedWeight(
            planes=[p.to(device) for p in self.planes],
            scales=move(self.scales),
            zeros=None if self.zeros is None else move(self.zeros),
            bits=self.bits,
            group_size=self.group_size,
            shape=self.shape,
        )

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Flat tensors for a safetensors file, keys prefixed with `prefix`."""
        out = {f"{prefix}.plane{i}": p for i, p in enumerate(self.planes)}
        out[f"{prefix}.scales"] = self.scales
        if self.zeros is not None:
            out[f"{prefix}.zeros"] = self.zeros
        return out

    def meta(self) -> dict:
        """JSON-able description needed (with `tensors`) to rebuild this weight."""
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "shape": list(self.shape),
            "symmetric": self.symmetric,
        }

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], prefix: str, meta: dict
    ) -> QuantizedWeight:
        bits = int(meta["bits"])
        _check_bits(bits)
        return cls(
            planes=[tensors[f"{prefix}.plane{i}"] for i in range(len(PLANES[bits]))],
            scales=tensors[f"{prefix}.scales"],
            zeros=None if meta["symmetric"] else tensors[f"{prefix}.zeros"],
            bits=bits,
            group_size=int(meta["group_size"]),
            shape=tuple(meta["shape"]),
        )


@dataclass
class SplitFFNWeights:
    """Everything the split-FFN kernels consume for one FFN.

    Neurons are ordered [heavy (h) | light (l)]; pruned neurons are absent. The light count is a
    multiple of 32 (zero neurons pad it; they contribute exactly 0). Biases cover h + l neurons.
    """

    activation: str
    gated: bool
    heavy_up: torch.Tensor | None = None  # [h, H]
    heavy_gate: torch.Tensor | None = None  # [h, H]
    heavy_down: torch.Tensor | None = None  # [H, h]
    light_up: QuantizedWeight | None = None  # N = l, K = H
    light_gate: QuantizedWeight | None = None  # N = l, K = H
    light_down: QuantizedWeight | None = None  # N = H, K = l
    up_bias: torch.Tensor | None = None  # [h + l]
    gate_bias: torch.Tensor | None = None  # [h + l]
    down_bias: torch.Tensor | None = None  # [H]

    @property
    def n_heavy(self) -> int:
        return 0 if self.heavy_up is None else int(self.heavy_up.shape[0])

    @property
    def n_light(self) -> int:
        return 0 if self.light_up is None else int(self.light_up.shape[0])

    @property
    def hidden_size(self) -> int:
        if self.heavy_down is not None:
            return int(self.heavy_down.shape[0])
        if self.light_down is not None:
            return int(self.light_down.shape[0])
        raise ValueError("a split FFN needs a heavy or a light part")


HEAVY_MULTIPLE = 8  # heavy neurons padded to 16 bytes of fp16/bf16 for the kernels


def pad_heavy(w: SplitFFNWeights, multiple: int = HEAVY_MULTIPLE) -> SplitFFNWeights:
    """`w` itself if its heavy count is a multiple of `multiple`, else the same FFN with zero
    heavy neurons appended: zero up/gate rows, zero down columns and zero bias entries, so each
    adds exactly 0 to the output. h = ceil(5% of I) is rarely a multiple of 8; then the light
    columns of the activations `a` [M, h + l] start at an odd offset and heavy_down's rows are
    not 16 bytes apart, and kernel B reads both with 2-byte loads (H200, 4096x14336 at M = 1:
    the Gluon tier's kernel B 29.4 us with 717 heavy neurons, 15.4 us with 720). The cost is
    `pad` dense neurons: 3 of 717 in the example, 0.07% of the layer's bytes."""
    h = w.n_heavy
    pad = -h % multiple
    if not h or not pad:
        return w

    def rows(t: torch.Tensor | None, dim: int = 0) -> torch.Tensor | None:
        if t is None:
            return None
        shape = list(t.shape)
        shape[dim] = h + pad
        out = torch.zeros(shape, dtype=t.dtype, device=t.device)
        out.narrow(dim, 0, h).copy_(t)
        return out

    def bias(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        return torch.cat([t[:h], torch.zeros(pad, dtype=t.dtype, device=t.device), t[h:]])

    with torch.inference_mode(False):  # a module's buffers: usable outside inference mode too
        return replace(
            w,
            heavy_up=rows(w.heavy_up),
            heavy_gate=rows(w.heavy_gate),
            heavy_down=rows(w.heavy_down, 1),
            up_bias=bias(w.up_bias),
            gate_bias=bias(w.gate_bias),
        )
