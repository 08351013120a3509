"""Compressed checkpoints: exact round trips, refusals, corruption, determinism, no pickle."""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import pytest
import torch

import ffnsplit
from ffnsplit import io
from ffnsplit.apply import compress_model, ffn_geometry
from ffnsplit.errors import CheckpointError, FFNSplitError
from ffnsplit.io import is_compressed_dir, load_compressed, save_compressed
from ffnsplit.plan import LightFormat, load_plan, make_plan, plan_ffn_bytes
from ffnsplit.profile import profile_model
from tests.tiny_models import tiny_config, tiny_input_ids, tiny_model

LIGHTS = {
    "llama": LightFormat(bits=4, group_size=32),  # with an int8 heavy part
    "gpt2": LightFormat(bits=3, group_size=64, symmetric=True),
    "bert": LightFormat(bits=2, group_size=-1),
    "phi3": LightFormat(kind="lowrank", rank=8),
    "opt": LightFormat(bits=8, group_size=128),
}


def outputs(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def compressed(family: str, light: LightFormat | None = None, model=None):
    """(compressed tiny model, plan, input ids)."""
    model = model if model is not None else tiny_model(family)
    ids = tiny_input_ids(model)
    profile = profile_model(model, ids, batch_size=2)
    plan = make_plan(
        profile,
        geometry=ffn_geometry(model),
        light=light or LIGHTS[family],
        heavy_fraction=0.1,
        prune_fraction=0.05,
        heavy_dtype="int8" if family == "llama" else "float16",
    )
    compress_model(model, plan)
    return model, plan, ids


def checksums(folder) -> dict[str, str]:
    return {
        name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
        for name in sorted(os.listdir(folder))
    }


@pytest.mark.parametrize("family", sorted(LIGHTS))
def test_round_trip_is_exact(family, tmp_path):
    model, plan, ids = compressed(family)
    folder = save_compressed(model, None, plan, tmp_path / "out")
    assert is_compressed_dir(folder)
    loaded, tokenizer = load_compressed(folder)
    assert isinstance(tokenizer, io.MissingTokenizer)
    original = model.state_dict()
    restored = loaded.state_dict()
    assert original.keys() == restored.keys()
    for key, tensor in original.items():
        assert restored[key].dtype == tensor.dtype and torch.equal(restored[key], tensor), key
    assert torch.equal(outputs(loaded, ids), outputs(model, ids))
    report = json.loads((folder / "size_report.json").read_text())
    assert report["ffn_bytes"] == report["planned_ffn_bytes"] == sum(plan_ffn_bytes(plan))
    assert load_plan(folder / "plan.json").to_json() == plan.to_json()
    config = json.loads((folder / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "ffnsplit"
    assert quant["format_version"] == ffnsplit.FORMAT_VERSION
    assert len(quant["modules"]) == len(plan.layers)


def test_tied_embeddings_are_stored_once_and_retied(tmp_path):
    config = tiny_config("llama")
    config.tie_word_embeddings = True
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model, plan, ids = compressed("llama", model=model)
    folder = save_compressed(model, None, plan, tmp_path / "tied")
    aliases = json.loads((folder / "config.json").read_text())["quantization_config"]["aliases"]
    assert aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded, _ = load_compressed(folder)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(outputs(loaded, ids), outputs(model, ids))


def test_saves_are_byte_identical_and_overwrite_is_explicit(tmp_path):
    model, plan, _ = compressed("llama")
    first = save_compressed(model, None, plan, tmp_path / "a")
    again, plan_again, _ = compressed("llama")
    second = save_compressed(again, None, plan_again, tmp_path / "b")
    assert checksums(first) == checksums(second)
    with pytest.raises(FFNSplitError, match="exists: pass --overwrite") as info:
        save_compressed(model, None, plan, first)
    assert "\n" not in str(info.value)
    (first / "marker").write_text("old")
    save_compressed(model, None, plan, first, overwrite=True)
    assert not (first / "marker").exists()
    assert checksums(first) == checksums(second)


def test_interrupted_save_leaves_nothing(tmp_path):
    model, plan, _ = compressed("gpt2")

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_compressed(model, BrokenTokenizer(), plan, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_sharded_checkpoint_round_trip(tmp_path, monkeypatch):
    model, plan, ids = compressed("gpt2")
    monkeypatch.setattr(io, "MAX_SHARD_BYTES", 40_000)
    folder = save_compressed(model, None, plan, tmp_path / "sharded")
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (folder / "model.safetensors").exists()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    loaded, _ = load_compressed(folder)
    assert torch.equal(outputs(loaded, ids), outputs(model, ids))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, plan, ids = compressed("llama")
    folder = save_compressed(model, None, plan, tmp_path_factory.mktemp("ckpt") / "llama")
    return folder, outputs(model, ids), ids


def _copy(folder, target):
    target.mkdir()
    for name in os.listdir(folder):
        (target / name).write_bytes((folder / name).read_bytes())
    return target


def _one_line_error(folder, match):
    with pytest.raises(CheckpointError, match=match) as info:
        load_compressed(folder)
    assert "\n" not in str(info.value)


def test_truncated_and_corrupted_tensor_files_are_refused(saved, tmp_path):
    folder = saved[0]
    data = (folder / "model.safetensors").read_bytes()
    truncated = _copy(folder, tmp_path / "truncated")
    (truncated / "model.safetensors").write_bytes(data[: len(data) - 1000])
    _one_line_error(truncated, "truncated or corrupt")
    header = _copy(folder, tmp_path / "header")
    (header / "model.safetensors").write_bytes(data[:20])
    _one_line_error(header, "truncated or corrupt")
    flipped = _copy(folder, tmp_path / "flipped")
    corrupt = bytearray(data)
    corrupt[-5] ^= 0xFF
    (flipped / "model.safetensors").write_bytes(bytes(corrupt))
    _one_line_error(flipped, "sha256 mismatch")
    huge = _copy(folder, tmp_path / "huge")
    (huge / "model.safetensors").write_bytes((2**62).to_bytes(8, "little") + data[8:])
    _one_line_error(huge, "truncated or corrupt")


def test_wrong_shapes_in_the_header_are_refused_before_reading(saved, tmp_path):
    folder = _copy(saved[0], tmp_path / "shapes")
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    key = next(k for k in tensors if k.endswith("qheavy_up.scales"))
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    _one_line_error(folder, f"tensor {key} is")


def test_newer_format_and_foreign_checkpoints_are_refused(saved, tmp_path):
    newer = _copy(saved[0], tmp_path / "newer")
    config = json.loads((newer / "config.json").read_text())
    config["quantization_config"]["format_version"] = ffnsplit.FORMAT_VERSION + 1
    (newer / "config.json").write_text(json.dumps(config))
    _one_line_error(newer, rf"format {ffnsplit.FORMAT_VERSION + 1}, this ffnsplit .* reads <= ")
    plain = _copy(saved[0], tmp_path / "plain")
    del config["quantization_config"]
    (plain / "config.json").write_text(json.dumps(config))
    assert not is_compressed_dir(plain)
    _one_line_error(plain, "not an ffnsplit checkpoint")
    (plain / "config.json").write_text("{not json")
    _one_line_error(plain, "not valid JSON")
    _one_line_error(tmp_path / "missing", "no checkpoint folder")


class _Planted:
    """Unpickling this creates a marker file (what a malicious checkpoint would do)."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_is_never_unpickled(saved, tmp_path):
    folder = _copy(saved[0], tmp_path / "pickled")
    marker = tmp_path / "unpickled"
    payload = _Planted()
    payload.marker = str(marker)
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt"):
        (folder / name).write_bytes(pickle.dumps(payload))
    loaded, _ = load_compressed(folder)
    assert not marker.exists()
    assert torch.equal(outputs(loaded, saved[2]), saved[1])
    # The planted file really would have run code when unpickled.
    pickle.loads((folder / "pytorch_model.bin").read_bytes()).close()
    assert marker.exists()


def test_save_refuses_an_uncompressed_model_or_another_plan(tmp_path):
    model, plan, _ = compressed("llama")
    with pytest.raises(FFNSplitError, match="compress the model"):
        save_compressed(tiny_model("llama"), None, plan, tmp_path / "x")
    _, other_plan, _ = compressed("llama", light=LightFormat(bits=3, group_size=64))
    with pytest.raises(FFNSplitError, match="do not match the plan"):
        save_compressed(model, None, other_plan, tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_tensor_files_get_the_mode_of_the_other_files(tmp_path, monkeypatch):
    model, plan, _ = compressed("gpt2")
    umask = os.umask(0o022)
    try:
        single = save_compressed(model, None, plan, tmp_path / "single")
        os.umask(0o027)  # the umask is respected, not a fixed 0644
        monkeypatch.setattr(io, "MAX_SHARD_BYTES", 40_000)
        sharded = save_compressed(model, None, plan, tmp_path / "sharded")
    finally:
        os.umask(umask)
    for folder, mode in ((single, 0o644), (sharded, 0o640)):
        modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
        assert any(name.endswith(".safetensors") for name in modes)
        assert set(modes.values()) == {mode}, modes


def test_a_checkpoint_without_tokenizer_loads_and_says_so_when_the_tokenizer_is_used(
    saved, tmp_path
):
    from tests.test_data import word_tokenizer

    folder, expected, ids = saved
    loaded, tokenizer = load_compressed(folder)  # saved without a tokenizer
    assert torch.equal(outputs(loaded, ids), expected)  # the model alone works (info, bench)
    for use in (
        lambda: tokenizer("the cat"),
        lambda: tokenizer.model_max_length,
        lambda: tokenizer.encode("the cat"),
        lambda: len(tokenizer),
    ):
        with pytest.raises(CheckpointError, match="has no tokenizer") as info:
            use()
        assert str(folder) in str(info.value) and "\n" not in str(info.value)
        assert "copy the tokenizer files of the model it was compressed from" in str(info.value)
    # Saving the loaded model again keeps it tokenizer-less instead of failing.
    model, plan, _ = compressed("llama")
    again = save_compressed(model, tokenizer, plan, tmp_path / "again")
    assert not (again / "tokenizer.json").exists()
    # With a tokenizer the real one comes back.
    with_tokenizer = save_compressed(model, word_tokenizer(["the cat"]), plan, tmp_path / "tok")
    _, real = load_compressed(with_tokenizer)
    assert real.encode("the cat", add_special_tokens=False) == [
        real.convert_tokens_to_ids("the"),
        real.convert_tokens_to_ids("cat"),
    ]


def test_a_checkpoint_whose_config_lost_its_quantization_config_is_named(saved, tmp_path):
    from ffnsplit import models

    folder = _copy(saved[0], tmp_path / "lost")
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    assert not is_compressed_dir(folder)
    with pytest.raises(FFNSplitError, match="looks like a compressed ffnsplit checkpoint") as info:
        models.load_model(folder)  # as open_model does for a folder that is not compressed
    message = str(info.value)
    assert "\n" not in message and str(folder) in message
    assert "lacks the ffnsplit quantization_config: restore that config.json" in message


@pytest.mark.parametrize(
    "names",
    [
        ["model.layers.0.mlp.heavy_up"],
        ["h.1.mlp.light_down.plane0"],
        ["x.qheavy_gate_bias"],
        ["layers.3.ffn.lowrank_up.lowrank_a"],
    ],
)
def test_split_tensor_names_are_recognised(names):
    assert io.find_split_tensor(["model.embed_tokens.weight", *names]) == names[0]
    assert io.find_split_tensor(["model.layers.0.mlp.up_proj.weight", "mlp.down_bias"]) is None
