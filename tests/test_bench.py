"""`ffnsplit bench`: the layer bench's methods and their fp32 checks, the static-cache decoder
against Hugging Face's forward, the end-to-end comparison, outputs and one-line errors.

On the CPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py), so shapes are
tiny. On a machine with a GPU the same tests run the bench there (CUDA graphs included)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ffnsplit.errors import OptionError
from ffnsplit.eval import bench
from ffnsplit.kernels import fused_decode, mma_decode, tiles
from ffnsplit.plan import parse_light_format
from tests.test_cli import assert_one_line_error, run
from tests.test_data import word_tokenizer
from tests.tiny_models import tiny_input_ids, tiny_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = "128x256"  # H a multiple of torch int4's group (128), I too: every method runs
TOLERANCE = {  # relative error vs fp32 of the same weights
    "dense": 2e-3,
    "torch_int4": 2e-2,  # bf16 activations
    "ffnsplit": 2e-3,
    "kernel_A": 2e-3,
    "kernel_B": 2e-3,
    "reference": 2e-3,
}


def _layer(options: bench.BenchOptions) -> dict:
    payload = bench.run_bench(options)
    assert len(payload["layers"]) == 1
    return payload["layers"][0]


def test_layer_bench_runs_every_method_and_each_matches_fp32() -> None:
    """Every method, W4A8 included (--light-act int8: the split FFN on int8 light activations,
    checked against the same fp32 reference: its error is the int8 activations' own, small, and
    here hardly above fp16's, the bench's random light weights being small beside the heavy)."""
    payload = bench.run_bench(bench.BenchOptions(shapes=(SHAPE,), ms=(1, 20), copies=2,
                                                 repeats=1, device=DEVICE, light_act="int8"))  # fmt: skip
    assert len(payload["layers"]) == 1 and payload["settings"]["light_act"] == "int8"
    case = payload["layers"][0]
    assert case["heavy"] == 16 and case["light"] == 256 and case["copies"] == 2
    assert case["notes"] == [f"{bench.W4A8_METHOD}: int8 light activations (a different "
                             "numerics), error against the fp16-activation fp32 reference"]  # fmt: skip
    rows = {(r["m"], r["method"]): r for r in case["rows"]}
    assert not [r for r in case["rows"] if "error" in r]
    methods = (*bench.METHODS, bench.W4A8_METHOD)
    assert set(rows) == {(m, method) for m in (1, 20) for method in methods}
    for m in (1, 20):
        w4 = rows[(m, bench.W4A8_METHOD)]
        assert 0 < w4["rel_err"] < 5e-2 and w4["us"] > 0
        assert w4["path"] in ("w4a8", "w4a8+wgmma")
    assert f"{bench.W4A8_METHOD} (int8 light activations): M = 1" in bench.markdown(payload)
    with pytest.raises(OptionError, match="choose one of none, int8"):
        bench.BenchOptions(shapes=(SHAPE,), light_act="fp8")
    runs_mma = (
        DEVICE == "cuda" and mma_decode.ENABLED and mma_decode.available(torch.device(DEVICE))
    )
    tier = {m: "mma" if runs_mma and mma_decode.MIN_M <= m <= mma_decode.AUTO_MAX_M else None
            for m in (1, 20)}  # fmt: skip
    for (m, method), row in rows.items():
        if method == bench.W4A8_METHOD:
            continue
        assert row["rel_err"] < TOLERANCE[method], (m, method, row["rel_err"])
        assert row["us"] > 0 and row["GBps"] > 0
        assert row["x_floor"] == pytest.approx(row["us"] / row["floor_us"])
        assert row["vs_dense"] == pytest.approx(rows[(m, "dense")]["us"] / row["us"])
        # the kernel tier that served each M: the Gluon tier from MIN_M to AUTO_MAX_M rows where
        # it runs (a GPU of sm_80+), else the GEMV path (1 row) and the tl small tier (20)
        expected_path = tier[m] or {1: "gemv", 20: "small"}[m]
        fused = DEVICE == "cuda" and fused_decode.ENABLED and m <= fused_decode.AUTO_MAX_M
        if method == "ffnsplit" and fused:  # one launch (its halves keep their tiers)
            expected_path = "fused"
        assert row.get("path") == (expected_path if method in ("ffnsplit", "kernel_A",
                                                               "kernel_B") else None)  # fmt: skip
    bytes_ = case["weight_bytes"]
    assert bytes_["ffnsplit"] == bytes_["kernel_A"] + bytes_["kernel_B"]
    assert bytes_["dense"] == 3 * 128 * 256 * 2
    # int4 codes (half a byte per weight) plus bf16 scale and zero per group of 128
    assert bytes_["torch_int4"] == 3 * (128 * 256 // 2 + 128 * 256 // 128 * 2 * 2)


def test_a_wrong_kernel_output_shows_in_its_check(monkeypatch: pytest.MonkeyPatch) -> None:
    real = bench.ops.split_ffn

    def broken(x, w, backend="auto"):
        out = real(x, w, backend=backend)
        return out * 1.5 if backend == "triton" else out

    monkeypatch.setattr(bench.ops, "split_ffn", broken)
    case = _layer(bench.BenchOptions(shapes=(SHAPE,), ms=(1,), copies=1, repeats=1,
                                     device=DEVICE))  # fmt: skip
    errors = bench.max_errors(case)
    assert errors["ffnsplit"] == pytest.approx(0.5, rel=1e-2)
    assert errors["reference"] < TOLERANCE["reference"]


KERNELS = ["torch", "triton"]


def _decoder_model(family: str, kernels: str) -> torch.nn.Module:
    """A tiny fp32 model; on the GPU the triton decoder runs it there (the CPU one needs the
    interpreter), the torch decoder stays on the CPU."""
    model = tiny_model(family)
    return model.to("cuda") if kernels == "triton" and not tiles.INTERPRET else model


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_static_decoder_matches_the_hf_forward(family: str, kernels: str) -> None:
    model = _decoder_model(family, kernels)
    if family == "mistral":
        model.config.sliding_window = 5  # shorter than the sequence: the window mask matters
    ids = tiny_input_ids(model, batch=2, seq=12).to(model.device)
    with torch.no_grad():
        expected = model(ids).logits
        # 40 positions: the triton attention splits the cache into chunks of 16 keys
        decoder = bench.StaticDecoder(model, batch=2, max_len=40, kernels=kernels)
        assert decoder.kernels == (kernels == "triton")
        prefill = decoder.forward(ids[:, :8], decoder.key_positions[:8], last_only=False)
        steps = [decoder.forward(ids[:, t : t + 1], decoder.key_positions[t : t + 1])
                 for t in range(8, 12)]  # fmt: skip
    got = torch.cat([prefill, *steps], dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_static_decoder_projections_through_split_linear(monkeypatch) -> None:
    """FFNSPLIT_DECODER_PROJ=ffnsplit: q/k/v and o projections of up to PROJ_MAX_ROWS tokens go
    through split_linear (spied on) and give the logits the torch projections give."""
    if not tiles.INTERPRET and DEVICE != "cuda":
        pytest.skip("the triton decoder needs a GPU or the interpreter")
    monkeypatch.setenv("FFNSPLIT_DECODER_PROJ", "ffnsplit")
    model = _decoder_model("qwen2", "triton")  # q/k/v biases
    ids = tiny_input_ids(model, batch=1, seq=7).to(model.device)
    calls = []
    real = bench.qmm.split_linear

    def spy(x, *args, **kwargs):
        calls.append(x.shape[1])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(bench.qmm, "split_linear", spy)
    with torch.no_grad():
        decoder = bench.StaticDecoder(model, batch=1, max_len=16, kernels="triton")
        assert decoder.own_projections
        decoder.forward(ids[:, :6], decoder.key_positions[:6])
        own = decoder.forward(ids[:, 6:], decoder.key_positions[6:7])
        assert calls == [6] * 2 * len(decoder.layers) + [1] * 2 * len(decoder.layers)
        decoder.own_projections = False
        decoder.forward(ids[:, :6], decoder.key_positions[:6])
        plain = decoder.forward(ids[:, 6:], decoder.key_positions[6:7])
    assert len(calls) == 4 * len(decoder.layers)  # torch projections: no more calls
    torch.testing.assert_close(own, plain, rtol=1e-4, atol=1e-4)


def test_slower_than_dense_is_said() -> None:
    """The layer bench names every M where ffnsplit lost to dense fp16, with ratio and path."""
    rows = [
        {"m": 1, "method": "dense", "us": 97.0, "vs_dense": 1.0},
        {"m": 1, "method": "ffnsplit", "us": 34.4, "vs_dense": 2.82, "path": "mma"},
        {"m": 256, "method": "ffnsplit", "us": 245.3, "vs_dense": 0.6535, "path": "prefill"},
        {"m": 512, "method": "ffnsplit", "error": "OutOfResources"},
        {"m": 2048, "method": "ffnsplit", "us": 1266.6, "vs_dense": 0.94, "path": "dequant"},
    ]
    assert bench.slower_note(rows) == (
        "ffnsplit slower than dense fp16 at M = 256 (0.65x, path prefill), "
        "M = 2048 (0.94x, path dequant)"
    )
    assert bench.slower_note(rows[:2]) is None


def test_decoder_projections_choice(monkeypatch) -> None:
    """FFNSPLIT_DECODER_PROJ: auto is torch off sm_90 GPUs, a stated choice holds where it can
    run, a wrong value is an OptionError naming the choices."""
    cpu = torch.device("cpu")
    monkeypatch.delenv("FFNSPLIT_DECODER_PROJ", raising=False)
    assert bench.decoder_projections(cpu) == "torch"
    monkeypatch.setenv("FFNSPLIT_DECODER_PROJ", "torch")
    assert bench.decoder_projections(cpu) == "torch"
    monkeypatch.setenv("FFNSPLIT_DECODER_PROJ", "ffnsplit")
    assert bench.decoder_projections(cpu) == ("ffnsplit" if tiles.INTERPRET else "torch")
    monkeypatch.setenv("FFNSPLIT_DECODER_PROJ", "cublas")
    with pytest.raises(bench.OptionError, match="auto, ffnsplit or torch"):
        bench.decoder_projections(cpu)


@pytest.mark.parametrize("kernels", KERNELS)
def test_decode_steps_are_greedy_generation(kernels: str) -> None:
    model = _decoder_model("llama", kernels)
    ids = tiny_input_ids(model, batch=2, seq=6).to(model.device)
    with torch.no_grad():
        decoder = bench.StaticDecoder(model, batch=2, max_len=16, kernels=kernels)
        logits = decoder.forward(ids, decoder.key_positions[:6])
        decoder.start_decode(logits[:, -1].argmax(-1, keepdim=True), 6)
        sequence = torch.cat([ids, decoder.tokens.clone()], dim=1)
        for _ in range(3):
            decoder.decode_step()
            sequence = torch.cat([sequence, decoder.tokens.clone()], dim=1)
        expected = ids
        for _ in range(4):
            expected = torch.cat([expected, model(expected).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(sequence, expected)
    assert int(decoder.position) == 9


def test_static_decoder_refuses_other_architectures() -> None:
    with pytest.raises(bench.UnsupportedModelError, match="Llama-style"):
        bench.StaticDecoder(tiny_model("gemma"), batch=1, max_len=8)


def _e2e(heavy_fraction: float, light: str = "int4-g128", batch: int = 1) -> dict:
    options = bench.BenchOptions(e2e_shape="tiny", heavy_fraction=heavy_fraction, light=light,
                                 batch=batch, prompt_len=16, decode_steps=4, device=DEVICE)  # fmt: skip
    payload = bench.run_bench(options)
    assert not payload["layers"] and len(payload["e2e"]) == 1
    return payload["e2e"][0]


def test_e2e_twin_with_every_neuron_heavy_is_the_dense_model() -> None:
    result = _e2e(heavy_fraction=1.0, batch=2)
    cuda = DEVICE == "cuda"
    for side in ("dense", "compressed"):
        metrics = result[side]
        assert metrics["decode_tokens_per_s"] > 0 and metrics["prefill_tokens_per_s"] > 0
        assert metrics["decode_timing"] == ("cuda-graph" if cuda else "eager-cpu")
        assert metrics["prefill_timing"] == ("cuda-graph" if cuda else "eager-cpu")
        assert (metrics["peak_memory_bytes"] is not None) == cuda
    assert result["batch"] == 2
    # fp32 on the CPU: equal up to summation order; fp16 on a GPU: up to fp16 rounding
    assert result["logits_rel_err"] < (1e-2 if cuda else 1e-5)
    assert result["top1_agreement"] >= (0.9 if cuda else 1.0)
    assert result["twin"]["heavy_dtype"] == ("float16" if cuda else "float32")


def test_e2e_through_the_triton_decoder() -> None:
    """--decoder-kernels triton (the interpreter on the CPU): recorded, and a twin with every
    neuron heavy still gives the dense model's logits through it."""
    options = bench.BenchOptions(e2e_shape="tiny", heavy_fraction=1.0, prompt_len=4,
                                 decode_steps=1, repeats=1, device=DEVICE,
                                 decoder_kernels="triton")  # fmt: skip
    payload = bench.run_bench(options)
    assert payload["settings"]["decoder_kernels"] == "triton"
    result = payload["e2e"][0]
    assert result["compressed"]["decode_tokens_per_s"] > 0
    assert result["logits_rel_err"] < (1e-2 if DEVICE == "cuda" else 1e-5)
    with pytest.raises(bench.OptionError, match="--decoder-kernels"):
        bench.BenchOptions(e2e_shape="tiny", decoder_kernels="cuda")


def test_e2e_twin_error_grows_as_its_format_shrinks() -> None:
    int8 = _e2e(heavy_fraction=0.05, light="int8-g128")
    int2 = _e2e(heavy_fraction=0.0, light="int2-g128")
    assert 1e-5 < int8["logits_rel_err"] < int2["logits_rel_err"] < 1.0
    assert int8["compressed"]["ffn_bytes"] < int8["dense"]["ffn_bytes"]
    assert int2["compressed"]["ffn_bytes"] < int8["compressed"]["ffn_bytes"]
    assert "random weights" in int8["source"] and "only shows the split model runs" in (
        bench.logits_line(int8)
    )
    assert "only shows" not in bench.logits_line(dict(int8, source="smollm2-135m"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny llama saved as an HF folder with a tokenizer, and its compressed version (random
    5% heavy, RTN)."""
    from ffnsplit import apply, io
    from ffnsplit.arch import model_fingerprint

    root = tmp_path_factory.mktemp("bench")
    model = tiny_model("llama")
    model.save_pretrained(root / "dense")
    word_tokenizer([" ".join(f"w{i}" for i in range(100))]).save_pretrained(root / "dense")
    plan = bench.random_plan(model, heavy_fraction=0.05, light=parse_light_format("int4-g128"),
                             fingerprint=model_fingerprint(model))  # fmt: skip
    apply.compress_model(model, plan)
    io.save_compressed(model, None, plan, root / "compressed")
    return {"dense": root / "dense", "compressed": root / "compressed", "root": root}


def test_cli_bench_of_a_compressed_folder_against_its_original(folders: dict[str, Path]) -> None:
    root = folders["root"]
    results = root / "RESULTS.md"
    results.write_text("# Results\n\nearlier section\n")
    code, output = run(
        "bench", folders["compressed"], "--against", folders["dense"], "--m", "1", "--copies", 1,
        "--repeats", 1, "--prompt-len", 8, "--decode-steps", 2, "--device", DEVICE,
        "--json", root / "bench.json", "--append", results,
    )  # fmt: skip
    assert code == 0, output
    payload = json.loads((root / "bench.json").read_text())
    for key in ("card", "torch", "triton", "transformers", "date", "command"):
        assert payload[key], key
    assert payload["smoke"] == (DEVICE == "cpu") and payload["complete"]
    assert payload["command"].startswith(f"ffnsplit bench {folders['compressed']} --m 1 ")
    assert "--against" in payload["command"]
    (case,) = payload["layers"]  # both layers share one layout
    assert case["layers"] == [0, 1] and case["shape"] == [64, 160]
    assert case["heavy"] == 8 and case["light"] == 160  # ceil(5% of 160), 152 padded to 32
    assert any("torch_int4 skipped" in note for note in case["notes"])  # H=64 < group 128
    methods = {r["method"] for r in case["rows"]}
    assert methods == {"dense", "ffnsplit", "kernel_A", "kernel_B", "reference"}
    for row in case["rows"]:
        assert row["rel_err"] < TOLERANCE[row["method"]], row
        for key in ("m", "us", "GBps", "x_floor", "vs_dense", "timing"):
            assert key in row
    (e2e,) = payload["e2e"]
    assert e2e["dense"]["decode_tokens_per_s"] > 0 and e2e["compressed"]["decode_tokens_per_s"] > 0
    assert 0 < e2e["logits_rel_err"] < 0.5 and e2e["weights_ratio"] < 1
    text = results.read_text()
    assert text.startswith("# Results\n\nearlier section\n\n### Split FFN layer layers 0-1")
    assert "### End-to-end" in text and payload["card"] in text and payload["command"] in text
    assert "x byte floor" in output and "decode tok/s" in output


def test_cli_without_a_gpu_says_how_to_get_smoke_numbers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, output = run("bench", "--shape", SHAPE, "--json", tmp_path / "b.json")
    assert_one_line_error(code, output, "--device cpu", "CUDA")
    assert not (tmp_path / "b.json").exists()


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--shape", "4096*14336"], ["--shape", "HxI"]),
        (["--shape", "100x300"], ["multiple of 32"]),
        (["--m", "1,x"], ["--m", "positive integers"]),
        (["--m", "0"], ["--m"]),
        (["--e2e-shape", "llama9"], ["--e2e-shape", "llama3-8b"]),
        (["--against", "{dense}"], ["--against", "compressed folder"]),
        (["{dense}"], ["not a compressed ffnsplit folder"]),
        (["{root}/missing"], ["not a folder"]),
        (["--shape", SHAPE, "--light", "lowrank-r8"], ["--light", "quantized"]),
        (["--e2e-shape", "tiny", "--light", "int4-g128-gptq"], ["RTN"]),
        (["--e2e-shape", "tiny", "--batch", "0"], ["--batch"]),
        (["--shape", SHAPE, "--heavy-fraction", "1.5"], ["--heavy-fraction"]),
    ],
)
def test_bad_inputs_are_one_line_errors(
    folders: dict[str, Path], args: list[str], needles: list[str]
) -> None:
    values = {"dense": folders["dense"], "root": folders["root"]}
    code, output = run("bench", *(a.format(**values) for a in args), "--device", "cpu")
    assert_one_line_error(code, output, *needles)


def test_out_of_memory_says_what_to_change(monkeypatch: pytest.MonkeyPatch) -> None:
    def exhausted(*_args, **_kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(bench, "shape_case", exhausted)
    code, output = run("bench", "--shape", SHAPE, "--device", "cpu")
    assert_one_line_error(code, output, "out of memory", "--copies")
    monkeypatch.setattr(bench, "random_llama", exhausted)
    code, output = run("bench", "--e2e-shape", "tiny", "--device", "cpu")
    assert_one_line_error(code, output, "out of memory", "--batch", "--e2e-shape")
