"""The profiler: statistics against a brute-force loop, sequential mode, files, bad input."""

from __future__ import annotations

import io
import json
import math
import struct

import pytest
import torch
import transformers
from rich.console import Console
from rich.progress import Progress

from ffnsplit.arch import apply_activation, decoder_layers, get_ffn_blocks
from ffnsplit.errors import CheckpointError, NumericalError, OptionError
from ffnsplit.profile import (
    RUN_TIMING_KEYS,
    STAT_NAMES,
    LayerStats,
    Profile,
    profile_model,
    summary_table,
)
from tests.tiny_models import tiny_config, tiny_input_ids, tiny_model


def _assert_stats_equal(first: Profile, second: Profile, tol: float) -> None:
    assert first.num_layers == second.num_layers
    for a, b in zip(first.layers, second.layers, strict=True):
        for name in STAT_NAMES:
            torch.testing.assert_close(
                getattr(a, name), getattr(b, name), rtol=tol, atol=tol, msg=f"{a.name} {name}"
            )


def _brute_force(model: torch.nn.Module, input_ids: torch.Tensor, topk_fraction: float) -> list:
    """Per-layer statistics from a plain loop over tokens, with a = act(gate x) * up x by hand."""
    blocks = get_ffn_blocks(model)
    inputs: dict[int, list[torch.Tensor]] = {b.layer: [] for b in blocks}
    handles = [
        b.up_input_module.register_forward_pre_hook(
            lambda module, args, layer=b.layer: inputs[layer].append(args[0].detach())
        )
        for b in blocks
    ]
    with torch.no_grad():
        for row in input_ids:  # one block at a time
            model(input_ids=row[None])
    for handle in handles:
        handle.remove()
    half = input_ids.shape[0] // 2
    results = []
    for block in blocks:
        parts = block.parts()
        up, gate, down = (
            None if t is None else t.double() for t in (parts.up, parts.gate, parts.down)
        )
        up_bias, gate_bias = parts.up_bias, parts.gate_bias
        col = down.pow(2).sum(0).sqrt()
        size = col.numel()
        k = math.ceil(topk_fraction * size)
        sums = {
            n: torch.zeros(size, dtype=torch.float64) for n in ("abs", "sq", "out0", "out1", "freq")
        }
        count = [0, 0]
        abs_max = torch.zeros(size, dtype=torch.float64)
        for block_index, x_block in enumerate(inputs[block.layer]):
            which = 0 if block_index < half else 1
            for x in x_block.reshape(-1, x_block.shape[-1]).double():
                u = up @ x + (0 if up_bias is None else up_bias.double())
                if gate is None:
                    a = apply_activation(parts.activation, u)
                else:
                    g = gate @ x + (0 if gate_bias is None else gate_bias.double())
                    a = apply_activation(parts.activation, g) * u
                out = a.abs() * col
                sums["abs"] += a.abs()
                sums["sq"] += a * a
                sums[f"out{which}"] += out
                abs_max = torch.maximum(abs_max, a.abs())
                sums["freq"][torch.argsort(out, descending=True, stable=True)[:k]] += 1
                count[which] += 1
        total = sum(count)
        results.append(
            {
                "out_norm_mean": (sums["out0"] + sums["out1"]) / total,
                "abs_mean": sums["abs"] / total,
                "abs_max": abs_max,
                "sq_mean": sums["sq"] / total,
                "topk_freq": sums["freq"] / total,
                "out_norm_mean_first_half": sums["out0"] / count[0],
                "out_norm_mean_second_half": sums["out1"] / count[1],
                "down_col_norm": col,
            }
        )
    return results


@pytest.mark.parametrize(("family", "batch_size"), [("llama", 2), ("gpt2", 2), ("llama", 3)])
def test_statistics_equal_brute_force(family: str, batch_size: int) -> None:
    """Gated with biases (llama) and plain GELU with Conv1D weights (gpt2); odd block count;
    batch size 3: the first batch straddles the two halves (blocks 0-1 | 2)."""
    model = tiny_model(family)
    input_ids = tiny_input_ids(model, batch=5, seq=8)
    profile = profile_model(model, input_ids, topk_fraction=0.05, batch_size=batch_size)
    expected = _brute_force(model, input_ids, 0.05)
    assert profile.meta["tokens"] == 40 and profile.meta["tokens_per_half"] == [16, 24]
    for stats, reference in zip(profile.layers, expected, strict=True):
        for name in STAT_NAMES:
            actual = getattr(stats, name)
            assert actual.dtype == torch.float32 and actual.shape == (160,)
            torch.testing.assert_close(
                actual.double(), reference[name], rtol=1e-5, atol=1e-5, msg=f"{stats.name} {name}"
            )
        # every token contributes exactly k = ceil(0.05 * 160) = 8 top-k memberships
        assert stats.topk_freq.sum().item() == pytest.approx(8.0, abs=1e-4)


def _stats_inputs(tokens: int, size: int, dtype: torch.dtype, kind: str) -> tuple:
    """Activations (a view with a row stride wider than `size`), norms, fresh accumulators.

    kind: "randn"; "ties": few distinct values and equal norms, so many exact ties at the k-th
    largest (zeros too); "zeros": every other row all zero, the rest with ties."""
    wide = torch.randn(tokens, size + 3)
    if kind in ("ties", "zeros"):
        wide = torch.randint(-3, 4, wide.shape).float()
    if kind == "zeros":
        wide[::2] = 0.0
    a = wide.to(dtype)[:, :size]
    col = torch.ones(size) if kind != "randn" else torch.rand(size) + 0.1
    accumulators = [
        torch.rand(size),
        torch.rand(size),
        torch.rand(size),
        torch.randint(0, 9, (size,)),
    ]
    return a, col, accumulators


def _check_stats_kernel(a: torch.Tensor, col: torch.Tensor, k: int, start: list) -> list:
    """Run the kernel on copies of the accumulators `start`; compare with the torch path (counts
    bit-identical, sums close) and with a stable argsort per token; return the kernel's."""
    from ffnsplit.kernels.profile_stats import accumulate_stats
    from ffnsplit.profile import accumulate_stats_torch

    device = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter takes CPU tensors
    expected = [t.clone() for t in start]
    actual = [t.to(device, copy=True) for t in start]
    accumulate_stats_torch(a, col, k, *expected)
    accumulate_stats(a.to(device), col.to(device), k, *actual)
    actual = [t.cpu() for t in actual]
    for name, x, y in zip(("abs", "sq", "max", "count"), actual, expected, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=name)
    assert torch.equal(actual[3], expected[3])
    out = a.float().abs() * col
    brute = torch.zeros(a.shape[1], dtype=torch.int64)
    for row in out:
        brute[torch.argsort(row, descending=True, stable=True)[:k]] += 1
    assert torch.equal(actual[3] - start[3], brute)
    assert (actual[3] - start[3]).sum().item() == k * a.shape[0]
    return actual


@pytest.mark.parametrize(
    ("tokens", "size", "k", "dtype", "kind"),
    [
        (13, 160, 8, torch.float32, "randn"),  # row pieces 128 + 32
        (7, 1000, 50, torch.bfloat16, "randn"),  # 512 + 256 + 256 (232 real)
        (11, 200, 1, torch.float16, "randn"),  # k = 1; 128 + 64 + 8
        (9, 7, 7, torch.float32, "randn"),  # k = I; 4 + 2 + 1
        (10, 100, 9, torch.float32, "ties"),  # 64 + 32 + 4
        (8, 33, 32, torch.float16, "ties"),  # k = I - 1; 32 + 1
        (12, 45, 5, torch.float32, "zeros"),  # all-zero rows: the cut falls inside the zeros
        (5, 1536, 77, torch.float32, "randn"),  # SmolLM2-135M: 1024 + 512
        (4, 1, 1, torch.float16, "randn"),
    ],
)
def test_stats_kernel_equals_torch_path(tokens, size, k, dtype, kind) -> None:
    """The Triton kernels (interpreted on the CPU, with a few programs each looping over rows
    and token splits) give the torch path's numbers; top-k counts exactly, ties at the k-th value
    going to the lowest indices."""
    a, col, start = _stats_inputs(tokens, size, dtype, kind)
    _check_stats_kernel(a, col, k, start)


def test_stats_partials_over_calls_equal_torch_path() -> None:
    """The profiler's running partials (two launches a call; one flush launch for the slots of
    all FFNs of a half) add up calls of different lengths into each slot (FFN and half) exactly
    as the torch path does."""
    from ffnsplit.kernels.profile_stats import StatsPartials
    from ffnsplit.profile import accumulate_stats_torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    size, k, ffns = 130, 13, 3
    cols = (torch.rand(ffns, size) + 0.1).to(device)
    batches = [  # (half, FFN, tokens, kind)
        (0, 0, 9, "randn"),
        (0, 2, 6, "ties"),
        (1, 0, 5, "zeros"),
        (1, 1, 11, "randn"),
        (0, 1, 3, "ties"),
        (1, 2, 4, "randn"),
    ]
    partials = StatsPartials(2 * ffns)  # slot: half * ffns + FFN
    actual = [torch.zeros(2, ffns, size), torch.zeros(ffns, size), torch.zeros(ffns, size)]
    actual = [t.to(device) for t in actual]
    actual.append(torch.zeros(ffns, size, dtype=torch.int64, device=device))
    expected = [t.clone().cpu() for t in actual]
    for half, ffn, tokens, kind in batches:
        a = _stats_inputs(tokens, size, torch.float32, kind)[0]
        partials.add(a.to(device), cols[ffn], k, half * ffns + ffn)
        sums = (expected[0][half, ffn], *(t[ffn] for t in expected[1:]))
        accumulate_stats_torch(a, cols[ffn].cpu(), k, *sums)
    for _ in range(2):  # a second flush adds nothing: the partials were zeroed
        for half in (0, 1):
            partials.flush(actual[0][half], *actual[1:], first=half * ffns)
    for name, x, y in zip(("abs", "sq", "max", "count"), actual, expected, strict=True):
        torch.testing.assert_close(x.cpu(), y, rtol=1e-5, atol=1e-5, msg=name)
    assert torch.equal(actual[3].cpu(), expected[3])
    assert expected[3][1].sum() == 14 * k  # FFN 1 saw 11 + 3 tokens


@pytest.mark.parametrize("sequential", [False, True])
def test_profile_with_kernel_partials_equals_torch_path(
    monkeypatch: pytest.MonkeyPatch, sequential: bool
) -> None:
    """profile_model through the kernels' running partials (forced onto the interpreter here;
    CUDA uses them by default): a slot per layer (one slot reused layer after layer in
    sequential mode), flushed at the switch of half, the end of a layer and the end of the run:
    the same statistics as the torch path, halves included."""
    import ffnsplit.profile as profile_module

    model = tiny_model("llama")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not sequential:  # the kernels need CUDA tensors on a GPU (no interpreter)
        model = model.to(device)
    input_ids = tiny_input_ids(model, batch=5, seq=8)
    # batch size 3: the first batch straddles the halves (blocks 0-1 | 2)
    options = {"batch_size": 3, "sequential": sequential, "device": device}
    monkeypatch.setattr(profile_module, "_use_kernels", lambda a, size: False)
    expected = profile_model(model, input_ids, **options)
    monkeypatch.setattr(profile_module, "_use_kernels", lambda a, size: True)
    actual = profile_model(model, input_ids, **options)
    for x, y in zip(actual.layers, expected.layers, strict=True):
        for name in STAT_NAMES:
            torch.testing.assert_close(getattr(x, name), getattr(y, name), rtol=1e-5, atol=1e-6)


def test_stats_kernel_deterministic() -> None:
    """Two calls on the same input give bit-identical accumulators (fixed summation order)."""
    from ffnsplit.kernels.profile_stats import accumulate_stats

    a, col, start = _stats_inputs(9, 130, torch.float32, "randn")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    for _ in range(2):
        sums = [t.to(device, copy=True) for t in start]
        accumulate_stats(a.to(device), col.to(device), 13, *sums)
        results.append([t.cpu() for t in sums])
    for x, y in zip(*results, strict=True):
        assert torch.equal(x, y)


def test_stats_kernel_launch_shapes() -> None:
    from ffnsplit.kernels.profile_stats import MAX_SIZE, col_split, row_pieces, row_warps

    for size in [1, 2, 3, 7, 45, 160, 1000, 1536, 2560, 5632, 8192, 14336, MAX_SIZE]:
        pieces = row_pieces(size)
        assert pieces[0] >= pieces[1] >= pieces[2] >= 0
        assert all(p & (p - 1) == 0 for p in pieces)  # powers of two (or 0)
        assert size <= sum(pieces) < size + max(1, pieces[2] if size <= 8192 else pieces[0] // 2)
        assert 32 * row_warps(size) * 64 >= sum(pieces) or row_warps(size) == 1
    assert row_pieces(1536) == (1024, 512, 0) and row_warps(1536) == 1
    assert row_pieces(5632) == (4096, 1024, 512) and row_warps(5632) == 4
    assert row_pieces(14336) == (16384, 0, 0) and row_warps(14336) == 8
    for tokens, programs, block_t in [(1, 3, 4), (37, 3, 4), (16384, 528, 16), (100, 10**6, 16)]:
        splits, rows = col_split(tokens, 1536, programs, block_t)
        assert rows % block_t == 0 and splits * rows >= tokens > (splits - 1) * rows
    assert col_split(16384, 1536, 528, 16) == (86, 192)  # 6 x 86 programs: one wave of 132 x 4


def test_stats_kernel_resident_blocks() -> None:
    """Programs per SM from the compiled kernel's registers (a GPU), else the estimate."""
    from ffnsplit.kernels.profile_stats import _row_select_kernel, blocks_per_sm, resident_blocks

    assert blocks_per_sm(72, 1) == 28 and blocks_per_sm(128, 4) == 4 and blocks_per_sm(8, 1) == 32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(64, 1536, device=device, dtype=torch.bfloat16)
    col = torch.rand(1536, device=device)
    cuts = torch.empty(2, 64, dtype=torch.int32, device=device)
    const = {"B0": 1024, "B1": 512, "B2": 0, "GALLOP": 2 << 23}
    blocks = resident_blocks(_row_select_kernel, (a, col, cuts, 64, 1536, 1536, 77, 2), const, 1, 7)
    assert blocks == 7 if device == "cpu" else 1 <= blocks <= 32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels need a CUDA GPU")
@pytest.mark.parametrize(
    ("tokens", "size", "k", "dtype", "ties"),
    [
        (16384, 1536, 77, torch.bfloat16, False),  # SmolLM2-135M batch: one warp per row
        (3001, 1536, 77, torch.bfloat16, True),  # norms 1: bf16 |a| ties at the k-th value
        (4099, 2560, 128, torch.bfloat16, False),  # 2 warps per row, 2048 + 512
        (1027, 14336, 717, torch.bfloat16, True),  # Llama-3-8B: 8 warps, one padded piece
        (513, 5632, 282, torch.bfloat16, False),  # 4 warps, 4096 + 1024 + 512
        (2048, 1000, 1, torch.float16, False),
        (777, 333, 333, torch.float32, False),
    ],
)
def test_stats_kernel_gpu_real_shapes(tokens, size, k, dtype, ties) -> None:
    """Compiled kernels at real shapes (GPU only): exact counts, close sums, deterministic."""
    from ffnsplit.kernels.profile_stats import accumulate_stats
    from ffnsplit.profile import accumulate_stats_torch

    a = torch.randn(tokens, size, device="cuda").to(dtype)
    a[::7, : size // 3] = 0  # zeros in part of the rows
    a[5::11] = 0  # rows of zeros: the cut falls inside them
    col = torch.ones(size, device="cuda") if ties else torch.rand(size, device="cuda") + 0.1
    start = [torch.zeros(size, device="cuda") for _ in range(3)]
    start.append(torch.zeros(size, dtype=torch.int64, device="cuda"))
    expected = [t.clone() for t in start]
    accumulate_stats_torch(a, col, k, *expected)
    results = []
    for _ in range(2):
        actual = [t.clone() for t in start]
        accumulate_stats(a, col, k, *actual)
        results.append(actual)
    for name, x, y in zip(("abs", "sq", "max", "count"), results[0], expected, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-3, msg=name)  # other sum order
    assert torch.equal(results[0][3], expected[3])
    for x, y in zip(*results, strict=True):
        assert torch.equal(x, y)


def _gemma3_mixed_layers() -> torch.nn.Module:
    """Gemma 3 with a sliding-window layer then a full-attention layer: per-layer masks differ."""
    config = tiny_config("gemma3_text")
    config.sliding_window = 4
    config.layer_types = ["sliding_attention", "full_attention"]
    torch.manual_seed(0)
    return transformers.Gemma3ForCausalLM(config).float().eval()


@pytest.mark.parametrize("family", ["llama", "gemma3_mixed", "gpt2", "bert"])
def test_sequential_equals_normal(family: str) -> None:
    model = _gemma3_mixed_layers() if family == "gemma3_mixed" else tiny_model(family)
    input_ids = tiny_input_ids(model, batch=6, seq=16)
    normal = profile_model(model, input_ids, batch_size=4, sequential=False)
    sequential = profile_model(model, input_ids, batch_size=2, sequential=True)
    assert sequential.meta["sequential"] and not normal.meta["sequential"]
    _assert_stats_equal(normal, sequential, 1e-5)


def test_sequential_uses_each_layers_own_arguments() -> None:
    """Reusing the first layer's mask for every layer would change the full-attention layer."""
    model = _gemma3_mixed_layers()
    input_ids = tiny_input_ids(model, batch=2, seq=16)
    reference = profile_model(model, input_ids, sequential=False)
    model.config.layer_types = ["sliding_attention", "sliding_attention"]
    for layer in decoder_layers(model):
        layer.attention_type = "sliding_attention"
        layer.self_attn.sliding_window = 4
    changed = profile_model(model, input_ids, sequential=True)
    assert not torch.allclose(reference.layers[1].out_norm_mean, changed.layers[1].out_norm_mean)
    torch.testing.assert_close(reference.layers[0].out_norm_mean, changed.layers[0].out_norm_mean)


def _hook_state(model: torch.nn.Module) -> list[int]:
    return [
        len(m._forward_pre_hooks) + len(m._forward_hooks) + ("forward" in m.__dict__)
        for m in model.modules()
    ]


@pytest.mark.parametrize("sequential", [False, True])
def test_hooks_removed_after_success_and_error(sequential: bool) -> None:
    model = tiny_model("llama")
    input_ids = tiny_input_ids(model, batch=4, seq=8)
    with torch.no_grad():
        logits = model(input_ids).logits
    clean = _hook_state(model)
    calls = []
    profile_model(
        model, input_ids, batch_size=1, sequential=sequential, progress=lambda d, t: calls.append(d)
    )
    assert _hook_state(model) == clean
    assert calls[-1] == pytest.approx(32) and calls == sorted(calls)

    def fail(done: float, total: int) -> None:
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        profile_model(model, input_ids, batch_size=1, sequential=sequential, progress=fail)
    assert _hook_state(model) == clean
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, logits, rtol=0, atol=0)


@pytest.mark.parametrize("whole_model", [False, True])
def test_runs_in_eval_mode(whole_model: bool) -> None:
    """A module in training mode (attention with dropout), alone or with the whole model, is run
    in eval mode all the same; the model is put back in its own mode afterwards."""
    model = tiny_model("llama").eval()
    input_ids = tiny_input_ids(model, batch=4, seq=8)
    reference = profile_model(model, input_ids, batch_size=2)
    attention = decoder_layers(model)[0].self_attn
    attention.attention_dropout = 0.5
    (model if whole_model else attention).train()
    _assert_stats_equal(profile_model(model, input_ids, batch_size=2), reference, tol=0)
    assert [m.training for m in model.modules()] == [whole_model] * len(list(model.modules()))


def test_rich_progress_reaches_total() -> None:
    model = tiny_model("llama")
    input_ids = tiny_input_ids(model, batch=2, seq=8)
    with Progress(console=Console(file=io.StringIO())) as progress:
        profile_model(model, input_ids, progress=progress)
        task = progress.tasks[0]
        assert task.completed == task.total == 16


@pytest.fixture
def small_profile() -> tuple[torch.nn.Module, Profile]:
    model = tiny_model("llama")
    input_ids = tiny_input_ids(model, batch=4, seq=8)
    meta = {"name": "tiny", "checksum": "abc"}
    return model, profile_model(model, input_ids, corpus_meta=meta)


def test_save_load_round_trip_exact(small_profile, tmp_path) -> None:
    model, profile = small_profile
    path = tmp_path / "profile.safetensors"
    profile.save(path)
    loaded = Profile.load(path)
    for a, b in zip(profile.layers, loaded.layers, strict=True):
        assert a.name == b.name
        for name in STAT_NAMES:
            assert torch.equal(getattr(a, name), getattr(b, name))
    saved = {k: v for k, v in profile.meta.items() if k not in RUN_TIMING_KEYS}
    assert {k: loaded.meta[k] for k in saved} == saved
    assert not RUN_TIMING_KEYS & set(loaded.meta)  # wall-clock numbers are not written
    assert loaded.meta["format_version"] == 1
    assert loaded.meta["corpus"] == {"name": "tiny", "checksum": "abc"}
    assert loaded.summary_rows() == profile.summary_rows()
    loaded.check_model(model)
    assert [p.name for p in tmp_path.iterdir()] == ["profile.safetensors"]  # no temp files left


def test_fingerprint_mismatch_refused(small_profile, tmp_path) -> None:
    _, profile = small_profile
    other = tiny_model("llama", seed=1)
    with pytest.raises(CheckpointError, match="made for another model.*run ffnsplit profile"):
        profile.check_model(other)
    profile.save(tmp_path / "profile.safetensors")
    with pytest.raises(CheckpointError, match=r"^profile\.safetensors was made for another model"):
        Profile.load(tmp_path / "profile.safetensors").check_model(other)


def _rewrite_header(path, change) -> None:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    raw = json.loads(data[8 : 8 + length])
    header = json.loads(raw["__metadata__"]["ffnsplit"])
    change(header)
    raw["__metadata__"]["ffnsplit"] = json.dumps(header)
    encoded = json.dumps(raw).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length :])


def _refused(path, match: str) -> None:
    with pytest.raises(CheckpointError, match=match) as excinfo:
        Profile.load(path)
    assert "\n" not in str(excinfo.value)


def test_bad_profile_files_refused(small_profile, tmp_path) -> None:
    _, profile = small_profile
    path = tmp_path / "p.safetensors"
    _refused(path, "no profile at")
    profile.save(path)
    good = path.read_bytes()
    for cut in (4, len(good) // 3, len(good) - 5):
        path.write_bytes(good[:cut])
        _refused(path, "truncated")
    flipped = bytearray(good)
    flipped[-3] ^= 0x40
    path.write_bytes(bytes(flipped))
    _refused(path, "corrupt")
    path.write_text("not a profile at all")
    _refused(path, "not a profile file")
    path.write_bytes(good)
    _rewrite_header(path, lambda h: h.update(format_version=2))
    _refused(path, "written by a newer ffnsplit")
    path.write_bytes(good)
    _rewrite_header(path, lambda h: h["layers"][0].update(intermediate_size=7))
    _refused(path, "not a valid profile")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("sequential", [False, True])
def test_nan_activation_names_the_layer(sequential: bool, device: str) -> None:
    """On a GPU the check of a normal run reads the flags of the final transfer, after the run."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 0] = float("nan")
    if not sequential:
        model = model.to(device)
    input_ids = tiny_input_ids(model, batch=2, seq=8)
    with pytest.raises(NumericalError, match=r"layer 1 \(model\.layers\.1\.mlp\)"):
        profile_model(model, input_ids, sequential=sequential, device=device)
    assert all(not b.down_module._forward_pre_hooks for b in get_ffn_blocks(model))


def test_bad_arguments() -> None:
    model = tiny_model("llama")
    with pytest.raises(OptionError, match="at least 2 calibration blocks"):
        profile_model(model, tiny_input_ids(model, batch=1, seq=8))
    with pytest.raises(OptionError, match="top-k fraction"):
        profile_model(model, tiny_input_ids(model, batch=2, seq=8), topk_fraction=0)
    with pytest.raises(OptionError, match="LongTensor"):
        profile_model(model, torch.zeros(2, 8))


def _hand_profile(scores: list[float]) -> Profile:
    values = torch.tensor(scores)
    stats = {name: values.clone() for name in STAT_NAMES}
    stats["abs_mean"] = torch.arange(len(scores), dtype=torch.float32)
    return Profile(layers=[LayerStats(name="ffn", **stats)], meta={})


def test_heavy_indices_fraction_and_share() -> None:
    profile = _hand_profile([1.0, 8.0, 2.0, 0.5, 4.0, 2.5, 1.0, 1.0, 0.0, 0.0])  # total 20
    assert profile.heavy_indices(0, fraction=0.2).tolist() == [1, 4]
    assert profile.heavy_indices(0, fraction=0.25).tolist() == [1, 4, 5]  # ceil(2.5)
    assert profile.heavy_indices(0, fraction=0.0).tolist() == []
    assert profile.heavy_indices(0, fraction=1.0).numel() == 10
    assert profile.heavy_indices(0, share=0.4).tolist() == [1]  # 8 / 20 exactly
    assert profile.heavy_indices(0, share=0.41).tolist() == [1, 4]
    assert profile.heavy_indices(0, share=0.75).tolist() == [1, 4, 5, 2]  # 16.5 / 20 >= 0.75
    assert profile.heavy_indices(0, share=1.0).numel() == 8  # the zeros add nothing
    assert profile.heavy_indices(0, fraction=0.2, score="abs_mean").tolist() == [9, 8]
    assert profile.top_share(0, 0.2) == pytest.approx(12 / 20)
    with pytest.raises(OptionError, match="exactly one"):
        profile.heavy_indices(0, fraction=0.1, share=0.5)
    with pytest.raises(OptionError, match="unknown score"):
        profile.heavy_indices(0, fraction=0.1, score="nope")


def test_summary_table_and_plot(small_profile, tmp_path) -> None:
    from ffnsplit.plotting import plot_profile

    _, profile = small_profile
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(summary_table(profile))
    text = console.export_text()
    assert "top 5%" in text and "overlap 5%" in text and "mean" in text
    rows = profile.summary_rows()
    assert all(r["top1_share"] <= r["top5_share"] <= r["top10_share"] <= 1 for r in rows)
    assert all(0 <= r["overlap5"] <= 1 for r in rows)
    path = tmp_path / "plot.png"
    plot_profile(profile, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]
    for name, magic in (
        ("plot.JPG", b"\xff\xd8\xff"),
        ("plot.pdf", b"%PDF"),
        ("plot.svg", b"<?xml"),
    ):
        plot_profile(profile, tmp_path / name)  # the suffix names the format
        assert (tmp_path / name).read_bytes().startswith(magic), name
    with pytest.raises(OptionError, match=r"\.bmp image; use \.png"):
        plot_profile(profile, tmp_path / "plot.bmp")
    assert not (tmp_path / "plot.bmp").exists()


@pytest.mark.slow
def test_smollm2_profile_shapes_and_heavy_share(cache_dir) -> None:
    from ffnsplit.data import load_corpus, token_blocks
    from ffnsplit.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    corpus = load_corpus("wiki-calib")
    input_ids = token_blocks(tokenizer, corpus, 4096, 256, 0, True)
    profile = profile_model(
        model, input_ids, corpus_meta={"name": corpus.name, "checksum": corpus.checksum}
    )
    assert profile.num_layers == 30
    assert all(s.out_norm_mean.shape == (1536,) for s in profile.layers)
    assert profile.meta["tokens"] == 4096
    shares = [row["top5_share"] for row in profile.summary_rows()]
    assert sum(shares) / len(shares) > 0.08  # a uniform layer would give 0.05
    profile.check_model(model)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_final_statistics_cuda_and_host(device) -> None:
    """The final statistics computed on the store's device (one transfer) are bit-identical to
    the host formulas on the transferred sums, and the finite flags name the NaN/Inf rows."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from ffnsplit.profile import _Store

    n, size = 5, 1536
    gen = torch.Generator().manual_seed(0)
    stats = torch.rand(5, n, size, generator=gen) * 1e4
    stats[3] = torch.rand(n, size, generator=gen) * 30
    stats[0, 1, 7] = float("nan")
    stats[1, 3, 0] = float("inf")
    counts = torch.randint(0, 20000, (n, size), generator=gen)
    tokens = [[16384 + 3 * i, 16384 - 5 * i] for i in range(n)]
    store = _Store([None] * n, size, sequential=False)
    store.stats, store.counts = stats.to(device), counts.to(device)
    values, flags = store.to_host(tokens)
    assert values.device.type == "cpu" and flags.device.type == "cpu"
    assert flags.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert store.bad_rows([0, 1, 2, 3, 4]) == [1, 3]
    # the host formulas of session 4c (computed on the host copy of the sums)
    t = torch.tensor(tokens, dtype=torch.float64)
    total = t.sum(1, keepdim=True)
    halves = t.float()
    col = stats[4]
    abs_mean = (stats[0] + stats[1]) / total.float()
    expected = {
        "out_norm_mean": abs_mean * col,
        "abs_mean": abs_mean,
        "abs_max": stats[3],
        "sq_mean": stats[2] / total.float(),
        "topk_freq": (counts.double() / total).float(),
        "out_norm_mean_first_half": stats[0] / halves[:, :1] * col,
        "out_norm_mean_second_half": stats[1] / halves[:, 1:] * col,
        "down_col_norm": col,
    }
    assert tuple(expected) == STAT_NAMES
    for value, (name, want) in zip(values, expected.items(), strict=True):
        torch.testing.assert_close(value, want, rtol=0, atol=0, equal_nan=True, msg=name)
