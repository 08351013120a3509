"""Tiny random models of every supported family, built from transformers configs (no downloads).

Hidden size 64, intermediate 160 (a multiple of 32, not a power of two), 2 layers, vocab 128.
Weights are drawn with a larger spread than Hugging Face's default init and every 1-D parameter
(biases, norm scales) is perturbed, so biases and norms are never trivially 0 or 1.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn

HIDDEN = 64
INTERMEDIATE = 160
LAYERS = 2
VOCAB = 128

_COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
    "initializer_range": 0.1,
}
_SPECIAL_TOKENS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
_DECODER = {**_COMMON, **_SPECIAL_TOKENS, "num_key_value_heads": 2, "tie_word_embeddings": False}
_GEMMA = {**_DECODER, "head_dim": 16}

# family -> (config class, model class, config kwargs)
_SPECS: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {**_DECODER, "mlp_bias": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", _DECODER),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _DECODER),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_DECODER, "head_dim": 16}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", _GEMMA),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", _GEMMA),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**_GEMMA, "sliding_window": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", _DECODER),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        {
            "vocab_size": VOCAB,
            "n_embd": HIDDEN,
            "n_inner": INTERMEDIATE,
            "n_layer": LAYERS,
            "n_head": 4,
            "n_positions": 64,
            "initializer_range": 0.1,
            **_SPECIAL_TOKENS,
        },
    ),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        {
            "vocab_size": VOCAB,
            "hidden_size": HIDDEN,
            "word_embed_proj_dim": HIDDEN,
            "ffn_dim": INTERMEDIATE,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
            "init_std": 0.1,
            **_SPECIAL_TOKENS,
        },
    ),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", _COMMON),
    "bert": ("BertConfig", "BertModel", _COMMON),
}

FAMILIES: list[str] = [*_SPECS, "gemma3"]


def _gemma3_multimodal() -> nn.Module:
    text = transformers.Gemma3TextConfig(**_GEMMA, sliding_window=8)
    vision = transformers.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = transformers.Gemma3Config(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
        image_token_index=VOCAB - 1,
        boi_token_index=VOCAB - 2,
        eoi_token_index=VOCAB - 3,
    )
    return transformers.Gemma3ForConditionalGeneration(config)


def tiny_config(family: str) -> transformers.PretrainedConfig:
    """The config of `tiny_model(family)` (for families other than the multimodal gemma3)."""
    config_cls, _, kwargs = _SPECS[family]
    return getattr(transformers, config_cls)(**kwargs)


def tiny_model(family: str, seed: int = 0) -> nn.Module:
    """A tiny fp32 model of `family` in eval mode, seeded: the same seed gives the same weights."""
    if family not in FAMILIES:
        raise KeyError(f"no tiny model for {family!r}; known: {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    if family == "gemma3":
        model = _gemma3_multimodal()
    else:
        model = getattr(transformers, _SPECS[family][1])(tiny_config(family))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model.float().eval()


def tiny_input_ids(model: nn.Module, batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    """Random token ids valid for `model` (avoiding the last 8 ids, which some configs reserve)."""
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab - 8, (batch, seq), generator=generator)
