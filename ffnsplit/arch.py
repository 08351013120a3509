"""Architecture adapters: where each model family keeps its FFNs, in one canonical form.

Every supported family is described by a `_Family` record (attribute paths relative to one
repeated layer); `get_ffn_blocks` turns a live model into `FFNBlock`s that read the weights in
canonical nn.Linear orientation, reorder neurons in place and swap in a replacement FFN. Anything
not understood (unknown `model_type`, mixture of experts, a layer without the expected FFN, an
activation other than the canonical ones) raises `UnsupportedModelError`: a model is never
half-processed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals
from transformers.pytorch_utils import Conv1D

from ffnsplit.errors import UnsupportedModelError

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": nn.functional.silu,
    "gelu": nn.functional.gelu,
    "gelu_tanh": lambda t: nn.functional.gelu(t, approximate="tanh"),
    "relu": nn.functional.relu,
}


def apply_activation(name: str, t: Tensor) -> Tensor:
    """Apply the canonical activation `name` (one of `ACTIVATIONS`)."""
    return ACTIVATIONS[name](t)


@dataclass
class FFNParts:
    """One FFN's weights in canonical nn.Linear orientation (see docs/ARCHITECTURE.md)."""

    up: Tensor  # [I, H]
    gate: Tensor | None  # [I, H]
    down: Tensor  # [H, I]
    up_bias: Tensor | None
    gate_bias: Tensor | None
    down_bias: Tensor | None
    activation: str

    @property
    def gated(self) -> bool:
        return self.gate is not None

    @property
    def hidden_size(self) -> int:
        return self.up.shape[1]

    @property
    def intermediate_size(self) -> int:
        return self.up.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        """Reference computation y = down(act(gate x) * up x) (or down(act(up x))), in x's dtype."""
        up = nn.functional.linear(x, self.up.to(x.dtype), _cast(self.up_bias, x.dtype))
        if self.gate is None:
            hidden = apply_activation(self.activation, up)
        else:
            gate = nn.functional.linear(x, self.gate.to(x.dtype), _cast(self.gate_bias, x.dtype))
            hidden = apply_activation(self.activation, gate) * up
        return nn.functional.linear(hidden, self.down.to(x.dtype), _cast(self.down_bias, x.dtype))


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


@dataclass(frozen=True)
class _Family:
    """Where one family keeps its FFN. Paths are relative to one repeated layer ("" = the layer).

    `install_at` is the module that receives the FFN input x and is replaced by the new FFN;
    `identities` are modules turned into nn.Identity so that the replacement's output y passes
    unchanged through the rest of the layer (for FFNs split over several layer attributes).
    """

    layer_paths: tuple[str, ...]
    root: str
    up: str
    gate: str | None
    down: str
    act: str
    install_at: str
    identities: tuple[str, ...] = ()
    fused_gate_up: bool = False  # up path holds [gate; up] stacked along the output dim (Phi-3)
    conv1d: bool = False  # GPT-2 Conv1D: weights stored [in, out]


_DECODER_PATHS = (
    "model.layers",
    "layers",
    "model.language_model.layers",
    "language_model.layers",
)
_GATED = _Family(
    layer_paths=_DECODER_PATHS,
    root="mlp",
    up="mlp.up_proj",
    gate="mlp.gate_proj",
    down="mlp.down_proj",
    act="mlp.act_fn",
    install_at="mlp",
)

_FAMILIES: dict[str, _Family] = {
    "llama": _GATED,
    "mistral": _GATED,
    "qwen2": _GATED,
    "qwen3": _GATED,
    "gemma": _GATED,
    "gemma2": _GATED,
    "gemma3": _GATED,  # multimodal: the language model's FFNs; the vision tower stays as is
    "gemma3_text": _GATED,
    # Phi3MLP: gate, up = gate_up_proj(x).chunk(2, dim=-1): the first half of the rows is the gate.
    "phi3": _Family(
        layer_paths=_DECODER_PATHS,
        root="mlp",
        up="mlp.gate_up_proj",
        gate=None,
        down="mlp.down_proj",
        act="mlp.activation_fn",
        install_at="mlp",
        fused_gate_up=True,
    ),
    "gpt2": _Family(
        layer_paths=("transformer.h", "h"),
        root="mlp",
        up="mlp.c_fc",
        gate=None,
        down="mlp.c_proj",
        act="mlp.act",
        install_at="mlp",
        conv1d=True,
    ),
    # OPTDecoderLayer runs fc1 -> activation_fn -> fc2 -> dropout -> + residual inline: the
    # replacement takes fc1's place and activation_fn, fc2 become identities.
    "opt": _Family(
        layer_paths=("model.decoder.layers", "decoder.layers"),
        root="",
        up="fc1",
        gate=None,
        down="fc2",
        act="activation_fn",
        install_at="fc1",
        identities=("activation_fn", "fc2"),
    ),
    "gpt_neox": _Family(
        layer_paths=("gpt_neox.layers", "layers"),
        root="mlp",
        up="mlp.dense_h_to_4h",
        gate=None,
        down="mlp.dense_4h_to_h",
        act="mlp.act",
        install_at="mlp",
    ),
    # BertLayer: output(intermediate(x), x) with intermediate = act(dense x) and
    # output = LayerNorm(dropout(dense a) + x): the replacement takes intermediate's place and
    # output.dense becomes an identity, so dropout, residual and LayerNorm stay as they were.
    "bert": _Family(
        layer_paths=("bert.encoder.layer", "encoder.layer"),
        root="",
        up="intermediate.dense",
        gate=None,
        down="output.dense",
        act="intermediate.intermediate_act_fn",
        install_at="intermediate",
        identities=("output.dense",),
    ),
}

_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def supported_families() -> list[str]:
    """The `config.model_type` values ffnsplit can process."""
    return sorted(_FAMILIES)


def _unsupported(reason: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{reason}; ffnsplit supports dense FFNs of: {', '.join(supported_families())}"
    )


def _lookup_family(model: nn.Module) -> tuple[str, _Family]:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise _unsupported(f"{type(model).__name__} has no Hugging Face config with a model_type")
    if model_type not in _FAMILIES:
        raise _unsupported(f"model type {model_type!r} is not supported")
    text_config = config.get_text_config()
    for cfg in (config,) if text_config is config else (config, text_config):
        for key in _MOE_KEYS:
            experts = getattr(cfg, key, None)
            if isinstance(experts, int) and experts > 0:
                raise _unsupported(
                    f"model type {model_type!r} with {key}={experts} is a mixture of experts"
                )
    return model_type, _FAMILIES[model_type]


def _find_layers(model: nn.Module, model_type: str, family: _Family) -> tuple[str, nn.ModuleList]:
    for path in family.layer_paths:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return path, layers
    raise _unsupported(
        f"{type(model).__name__} ({model_type!r}) has none of the layer lists "
        f"{', '.join(family.layer_paths)}"
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's repeated transformer layers, in order (for layer-by-layer calibration)."""
    model_type, family = _lookup_family(model)
    return _find_layers(model, model_type, family)[1]


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _split_path(path: str) -> tuple[str, str]:
    parent, _, attr = path.rpartition(".")
    return parent, attr


# Dense near 0 where the activations differ most, wide enough to catch clipped variants (gelu_10).
_PROBE = torch.cat([torch.linspace(-8.0, 8.0, 4001), torch.linspace(-1e3, 1e3, 2001)])


def _identify_activation(act: nn.Module | Callable[[Tensor], Tensor], where: str) -> str:
    """Canonical name of a live activation, found by comparing outputs on a fixed probe.

    Probing covers every Hugging Face spelling (silu/swish, gelu_new/gelu_pytorch_tanh/gelu_fast,
    ...) in every transformers version; anything not equal to a canonical activation to fp32
    rounding (quick_gelu, gelu_10, relu2, ...) is unsupported. The answer is remembered for
    activations that `_activation_key` can describe (every layer of a model has its own module,
    and probing takes about 0.1 ms a layer).
    """
    label = type(act).__name__
    if isinstance(act, nn.Module) and any(True for _ in act.parameters()):
        raise _unsupported(f"{where}: activation {label} has learned parameters")
    key = _activation_key(act)
    if key is not None and key in _ACTIVATION_NAMES:
        name = _ACTIVATION_NAMES[key]
    else:
        name = _probe_activation(act)
        if key is not None:
            if len(_ACTIVATION_NAMES) >= _ACTIVATION_CACHE_SIZE:
                _ACTIVATION_NAMES.clear()
            _ACTIVATION_NAMES[key] = name
    if name is None:
        raise _unsupported(f"{where}: activation {label} is not one of {', '.join(ACTIVATIONS)}")
    return name


def _probe_activation(act: nn.Module | Callable[[Tensor], Tensor]) -> str | None:
    with torch.no_grad():
        out = act(_PROBE.clone())
        for name in ACTIVATIONS:
            if torch.allclose(out, apply_activation(name, _PROBE), rtol=1e-5, atol=1e-6):
                return name
    return None


# Probe answers by `_activation_key` (None: not one of ACTIVATIONS); cleared when full.
_ACTIVATION_NAMES: dict[tuple, str | None] = {}
_ACTIVATION_CACHE_SIZE = 256
# nn.Module's own instance state (parameters, buffers, children, hooks, ...), empty or False in a
# plain activation module.
_MODULE_STATE = frozenset(vars(nn.Module())) - {"training"}
_GLOBAL_FORWARD_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_hooks_with_kwargs",
    "_global_forward_hooks_always_called",
    "_global_forward_pre_hooks",
)


def _activation_key(act: nn.Module | Callable[[Tensor], Tensor]) -> tuple | None:
    """What fixes an activation's function, or None where that is not known (probe every time).

    A module: its class, the class's forward and the values of its own attributes (plain numbers,
    strings, functions and functools.partial of those: GELUActivation's `act`, gelu_10's
    min/max, ...), provided it has no parameters, buffers, children or hooks, and no global
    forward hook is registered. A plain function or partial: itself.
    """
    if not isinstance(act, nn.Module):
        value = _value_key(act)
        return None if value is None else ("function", value)
    if any(getattr(_module_globals, name, None) for name in _GLOBAL_FORWARD_HOOKS):
        return None
    attributes = []
    for name, value in vars(act).items():
        if name in _MODULE_STATE:
            if value:  # a parameter, buffer, child module or hook
                return None
            continue
        value_key = _value_key(value)
        if value_key is None:
            return None
        attributes.append((name, value_key))
    return ("module", type(act), type(act).forward, tuple(sorted(attributes)))


def _value_key(value: object) -> object | None:
    """A hashable stand-in for an attribute value that fixes its behaviour, else None."""
    if value is None or isinstance(value, bool | int | float | str):
        return (type(value), value)
    if isinstance(value, types.FunctionType | types.BuiltinFunctionType):
        return value
    if isinstance(value, functools.partial):
        parts = [_value_key(value.func), *(_value_key(arg) for arg in value.args)]
        keywords = [(k, _value_key(v)) for k, v in sorted(value.keywords.items())]
        if any(part is None for part in parts) or any(v is None for _, v in keywords):
            return None
        return ("partial", tuple(parts), tuple(keywords))
    return None


@dataclass
class FFNBlock:
    """One FFN of a live model: read its canonical parts, reorder its neurons, replace it."""

    layer: int
    name: str
    module: nn.Module
    down_module: nn.Module
    up_input_module: nn.Module
    _layer_module: nn.Module
    _family: _Family
    _activation: str
    _installed: bool = False

    def _sub(self, path: str) -> nn.Module:
        return self._layer_module.get_submodule(path)

    def _weights(self) -> FFNParts:
        """Canonical views of the live weights (no copy except the Conv1D transpose)."""
        family = self._family
        up_mod, down_mod = self._sub(family.up), self._sub(family.down)
        up_w, down_w = up_mod.weight, down_mod.weight
        if family.conv1d:
            up_w, down_w = up_w.t(), down_w.t()
        up_b, down_b = up_mod.bias, down_mod.bias
        gate_w = gate_b = None
        if family.fused_gate_up:
            size = up_w.shape[0] // 2
            gate_w, up_w = up_w[:size], up_w[size:]
            if up_b is not None:
                gate_b, up_b = up_b[:size], up_b[size:]
        elif family.gate is not None:
            gate_mod = self._sub(family.gate)
            gate_w, gate_b = gate_mod.weight, gate_mod.bias
        return FFNParts(
            up=up_w,
            gate=gate_w,
            down=down_w,
            up_bias=up_b,
            gate_bias=gate_b,
            down_bias=down_b,
            activation=self._activation,
        )

    def _check_live(self) -> None:
        if self._installed:
            raise RuntimeError(f"{self.name}: the FFN was replaced; get the blocks again")

    def parts(self) -> FFNParts:
        """Detached clones of the weights in canonical orientation, in the dtype they are stored."""
        self._check_live()
        live = self._weights()

        def copy(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().clone().contiguous()

        return FFNParts(
            up=copy(live.up),
            gate=copy(live.gate),
            down=copy(live.down),
            up_bias=copy(live.up_bias),
            gate_bias=copy(live.gate_bias),
            down_bias=copy(live.down_bias),
            activation=live.activation,
        )

    def permute_(self, perm: Tensor) -> None:
        """Reorder the intermediate neurons in place: new neuron i is old neuron perm[i].

        Rows of up/gate (and their biases) and columns of down move together, so the FFN's
        function is unchanged. The Parameters keep their identity (data is copied in place).
        """
        self._check_live()
        family = self._family
        size = self._weights().intermediate_size
        perm = torch.as_tensor(perm).to(device="cpu", dtype=torch.long)
        if perm.shape != (size,) or not torch.equal(perm.sort().values, torch.arange(size)):
            raise ValueError(f"{self.name}: perm must be a permutation of range({size})")
        up_mod, down_mod = self._sub(family.up), self._sub(family.down)
        up_rows = torch.cat([perm, perm + size]) if family.fused_gate_up else perm
        with torch.no_grad():
            up_dim, down_dim = (1, 0) if family.conv1d else (0, 1)
            _permute_param(up_mod.weight, up_rows, up_dim)
            if up_mod.bias is not None:
                _permute_param(up_mod.bias, up_rows, 0)
            if family.gate is not None:
                gate_mod = self._sub(family.gate)
                _permute_param(gate_mod.weight, perm, 0)
                if gate_mod.bias is not None:
                    _permute_param(gate_mod.bias, perm, 0)
            _permute_param(down_mod.weight, perm, down_dim)

    def install(self, replacement: nn.Module) -> None:
        """Put `replacement` (x [..., H] -> y [..., H], down bias included) in the FFN's place.

        Whole-FFN modules (llama `mlp`, gpt2 `mlp`, ...) are swapped in their parent. For FFNs
        spread over a layer (OPT, BERT), the replacement takes the place of the module that
        receives x and the rest of the FFN path becomes nn.Identity (see `_FAMILIES`). Exact in
        eval mode; a swapped whole module also takes any dropout inside it along (GPT-2's
        resid_pdrop), which only acts in training.
        """
        self._check_live()
        family = self._family
        for path in (family.install_at, *family.identities):
            new = replacement if path == family.install_at else nn.Identity()
            parent, attr = _split_path(path)
            setattr(self._sub(parent), attr, new)
        if family.root == family.install_at:
            self.module = replacement
        self.up_input_module = replacement
        self._installed = True


def _permute_param(param: Tensor, index: Tensor, dim: int) -> None:
    param.copy_(param.index_select(dim, index.to(param.device)))


def _linear_shape(mod: nn.Module | None, conv1d: bool) -> tuple[int, int] | None:
    """(out_features, in_features) of a plain float Linear (or GPT-2 Conv1D), else None.

    The type must match exactly: quantized Linear subclasses (bitsandbytes, GPTQ, ...) and
    replacements installed earlier are not dense FFN weights.
    """
    kind = Conv1D if conv1d else nn.Linear
    if type(mod) is not kind:
        return None
    weight = mod._parameters.get("weight")  # what mod.weight finds first, without __getattr__
    if weight is None:
        weight = mod.weight
    if not weight.is_floating_point():
        return None
    rows, cols = weight.shape
    return (cols, rows) if conv1d else (rows, cols)


class _LayerModules:
    """Submodules of one layer by path (relative, "" = the layer), each path resolved once with
    get_submodule's rules: None where a step is missing or not an nn.Module."""

    def __init__(self, layer: nn.Module) -> None:
        self.found: dict[str, nn.Module | None] = {"": layer}

    def get(self, path: str) -> nn.Module | None:
        if path not in self.found:
            parent_path, attr = _split_path(path)
            parent = self.get(parent_path)
            child = None if parent is None else _child(parent, attr)
            self.found[path] = child if isinstance(child, nn.Module) else None
        return self.found[path]


def _child(parent: nn.Module, attr: str) -> object:
    """getattr(parent, attr, None), without the slow path through nn.Module.__getattr__ for a
    registered submodule that no instance or class attribute of that name hides."""
    modules = parent.__dict__.get("_modules")
    if (
        modules
        and attr in modules
        and attr not in parent.__dict__
        and not hasattr(type(parent), attr)
    ):
        return modules[attr]
    return getattr(parent, attr, None)


def _dense_hidden_size(
    modules: _LayerModules, family: _Family, hidden_size: int | None
) -> int | None:
    """The hidden size of the layer's dense FFN if it holds one with consistent shapes (and
    `hidden_size`, unless None), else None."""
    up = _linear_shape(modules.get(family.up), family.conv1d)
    if up is None or modules.get(family.act) is None or hidden_size not in (None, up[1]):
        return None
    size, hidden = up
    if family.fused_gate_up:
        if size % 2:
            return None
        size //= 2
    if _linear_shape(modules.get(family.down), family.conv1d) != (hidden, size):
        return None
    if family.gate is not None and _linear_shape(modules.get(family.gate), family.conv1d) != up:
        return None
    return hidden


def _make_block(
    index: int, prefix: str, layer: nn.Module, family: _Family, hidden_size: int | None
) -> tuple[FFNBlock, int]:
    """The layer's FFNBlock and the FFN's hidden size."""
    modules = _LayerModules(layer)
    hidden = _dense_hidden_size(modules, family, hidden_size)
    if hidden is None:
        expected = ", ".join(p for p in (family.up, family.gate, family.down) if p)
        raise _unsupported(
            f"layer {index} ({prefix}) lacks the expected dense FFN ({expected}); "
            "it may be a mixture of experts or already quantized or compressed"
        )
    name = _join(prefix, family.root)
    block = FFNBlock(
        layer=index,
        name=name,
        module=modules.get(family.root),
        down_module=modules.get(family.down),
        up_input_module=modules.get(family.install_at),
        _layer_module=layer,
        _family=family,
        _activation=_identify_activation(modules.get(family.act), name),
    )
    return block, hidden


def get_ffn_blocks(model: nn.Module) -> list[FFNBlock]:
    """Every FFN of the model, in layer order; raises UnsupportedModelError if any is not dense."""
    model_type, family = _lookup_family(model)
    path, layers = _find_layers(model, model_type, family)
    blocks: list[FFNBlock] = []
    hidden_size = None
    for index, layer in enumerate(layers):
        block, hidden_size = _make_block(index, f"{path}.{index}", layer, family, hidden_size)
        blocks.append(block)
    return blocks


def installed_ffns(model: nn.Module, kind: type[nn.Module]) -> list[tuple[int, str, nn.Module]]:
    """(layer, module path, replacement) for every FFN that `install` replaced by a `kind`.

    This is how a compressed model's FFNs are found again (get_ffn_blocks only accepts dense ones).
    """
    model_type, family = _lookup_family(model)
    path, layers = _find_layers(model, model_type, family)
    found = []
    for index, layer in enumerate(layers):
        module = layer.get_submodule(family.install_at) if family.install_at else layer
        if isinstance(module, kind):
            found.append((index, _join(f"{path}.{index}", family.install_at), module))
    return found


_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "transformers_version",
        "architectures",
        "_name_or_path",
        "name_or_path",
        "torch_dtype",
        "dtype",
        "_commit_hash",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "attn_implementation",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)


def _stable(value: object) -> object:
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in _VOLATILE_CONFIG_KEYS}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _hash_tensor(digest: hashlib._Hash, t: Tensor | None) -> None:
    if t is None:
        digest.update(b"none")
        return
    t = t.detach().to(device="cpu", dtype=torch.float32).contiguous()
    digest.update(json.dumps(list(t.shape)).encode())
    digest.update(t.view(torch.uint8).numpy().data)


def model_fingerprint(model: nn.Module) -> dict:
    """Identify a model: family, config hash, FFN shapes and a checksum of the FFN weights.

    Stable across save_pretrained / from_pretrained and dtype casts that keep the values
    (weights are hashed as float32, canonical orientation). JSON-serializable.
    """
    blocks = get_ffn_blocks(model)
    config = json.loads(model.config.to_json_string())
    config_hash = hashlib.sha256(json.dumps(_stable(config), sort_keys=True).encode())
    weights_hash = hashlib.sha256()
    for block in blocks:
        parts = block._weights()
        weights_hash.update(parts.activation.encode())
        for t in (
            parts.up,
            parts.gate,
            parts.down,
            parts.up_bias,
            parts.gate_bias,
            parts.down_bias,
        ):
            _hash_tensor(weights_hash, t)
    first = blocks[0]._weights()
    return {
        "model_type": model.config.model_type,
        "config_sha256": config_hash.hexdigest(),
        "num_ffn_blocks": len(blocks),
        "hidden_size": first.hidden_size,
        "intermediate_sizes": [b._weights().intermediate_size for b in blocks],
        "ffn_sha256": weights_hash.hexdigest(),
    }


def fingerprint_matches(a: dict, b: dict) -> bool:
    """True when two fingerprints describe the same model (same config and FFN weights)."""
    keys = (
        "model_type",
        "config_sha256",
        "num_ffn_blocks",
        "hidden_size",
        "intermediate_sizes",
        "ffn_sha256",
    )
    return all(a.get(k) == b.get(k) for k in keys)


def fingerprint_id(fingerprint: dict) -> str:
    """A short (12 hex) id of a fingerprint, for messages."""
    text = json.dumps(fingerprint, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
