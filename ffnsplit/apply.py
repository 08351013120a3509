"""Apply a split plan to a live model: every FFN becomes a SplitFFN, in place.

For each FFN the canonical weights (arch.FFNBlock.parts) are reordered [heavy | light | pruned]
by the plan; heavy neurons are kept dense in the plan's heavy dtype (or int8), light ones are
compressed (RTN or GPTQ group quantization, low-rank factors, kept dense, or pruned) and the
result is installed in the FFN's place. Calibration-driven formats (GPTQ, activation-weighted low-rank) run
the calibration tokens one decoder layer at a time (profile.run_calibration, sequential mode), so
only one layer's Hessians are in memory: the FFN input's [H, H] and the light activations'
[l, l]. Hessians are gathered on the dense model's activations (each layer is compressed after
every batch went through it). `measure_errors` feeds budget mode with each neuron's measured
error in every candidate format.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ffnsplit.arch import (
    FFNBlock,
    FFNParts,
    apply_activation,
    decoder_layers,
    fingerprint_id,
    fingerprint_matches,
    get_ffn_blocks,
    model_fingerprint,
)
from ffnsplit.compress.gptq import HessianAccumulator, quantize_gptq
from ffnsplit.compress.lowrank import lowrank_factorize
from ffnsplit.compress.quant import check_finite, quantize_rtn, rtn_dequantize
from ffnsplit.errors import CheckpointError, OptionError
from ffnsplit.kernels.format import PACK_ALIGN, QuantizedWeight, SplitFFNWeights
from ffnsplit.modules import LowRankLight, QuantizedHeavy, SplitFFN
from ffnsplit.plan import (
    HEAVY_INT8,
    SCALE_DTYPE,
    FFNGeometry,
    LayerPlan,
    LightFormat,
    NeuronErrors,
    SplitPlan,
    candidate_formats,
    default_candidates,
    dense_dtype,
    group_for,
    stored_heavy,
    stored_light,
)
from ffnsplit.profile import run_calibration, split_batches

Progress = Callable[[int, int], None]
"""Progress callback: (FFN layers done, FFN layers in total)."""


def ffn_geometry(model: nn.Module) -> FFNGeometry:
    """Hidden size, gating and biases of the model's FFNs (what the byte model needs)."""
    parts = get_ffn_blocks(model)[0].parts()
    return FFNGeometry(
        hidden_size=parts.hidden_size,
        gated=parts.gated,
        up_bias=parts.up_bias is not None,
        gate_bias=parts.gate_bias is not None,
        down_bias=parts.down_bias is not None,
    )


def weight_norm_scores(model: nn.Module) -> list[Tensor]:
    """Per layer, a weight-only heavy-hitter score [I]: ||up_i|| ||down[:, i]|| (x ||gate_i||).

    The product of the norms that scale neuron i's contribution, without any activation
    statistics: the `weight_norm` baseline of make_plan / plan_for_budget.
    """
    scores = []
    for block in get_ffn_blocks(model):
        parts = block.parts()
        score = torch.linalg.vector_norm(parts.up.float(), dim=1)
        score = score * torch.linalg.vector_norm(parts.down.float(), dim=0)
        if parts.gate is not None:
            score = score * torch.linalg.vector_norm(parts.gate.float(), dim=1)
        scores.append(score.cpu())
    return scores


def check_plan(plan: SplitPlan, model: nn.Module) -> None:
    """Refuse a plan made for another model (CheckpointError, one line)."""
    current = model_fingerprint(model)
    if not fingerprint_matches(plan.fingerprint, current):
        raise CheckpointError(
            f"the plan was made for another model (fingerprint {fingerprint_id(plan.fingerprint)}, "
            f"this model {fingerprint_id(current)}): make a plan from this model's profile"
        )
    geometry = ffn_geometry(model)
    if plan.geometry != geometry:
        raise CheckpointError(
            f"the plan's FFN geometry {plan.geometry.to_dict()} is not this model's "
            f"{geometry.to_dict()}: make a plan from this model's profile"
        )


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    return F.pad(t, (0, 0, 0, rows - t.shape[0]))


def _pad_vector(t: Tensor, size: int) -> Tensor:
    return F.pad(t, (0, size - t.shape[0]))


def _quantize(w: Tensor, light: LightFormat, hessian: Tensor | None, what: str) -> QuantizedWeight:
    group = group_for(light, w.shape[1])
    if light.method == "gptq":
        if hessian is None:
            raise OptionError(f"{what}: GPTQ needs calibration tokens (calib_ids)")
        return quantize_gptq(
            w, hessian, light.bits, group, light.symmetric, scale_dtype=SCALE_DTYPE
        )
    return quantize_rtn(w, light.bits, group, light.symmetric, scale_dtype=SCALE_DTYPE)


def _quantize_neurons(
    parts: FFNParts,
    index: Tensor,
    stored: int,
    fmt: LightFormat,
    input_hessian: Tensor | None,
    neuron_hessian: Tensor | None,
    where: str,
) -> tuple[QuantizedWeight, QuantizedWeight | None, QuantizedWeight]:
    """Quantize neurons `index` (up/gate rows, down columns), zero-padded to `stored` neurons."""
    up, down = parts.up.to(torch.float32), parts.down.to(torch.float32)
    q_up = _quantize(
        _pad_rows(up.index_select(0, index), stored), fmt, input_hessian, f"{where} up"
    )
    q_gate = None
    if parts.gate is not None:
        gate = _pad_rows(parts.gate.to(torch.float32).index_select(0, index), stored)
        q_gate = _quantize(gate, fmt, input_hessian, f"{where} gate")
    columns = _pad_rows(down.index_select(1, index).t(), stored).t().contiguous()
    if neuron_hessian is not None:
        pad = stored - index.numel()
        neuron_hessian = F.pad(neuron_hessian, (0, pad, 0, pad))
    q_down = _quantize(columns, fmt, neuron_hessian, f"{where} down")
    return q_up, q_gate, q_down


def build_split_ffn(
    parts: FFNParts,
    layer: LayerPlan,
    *,
    input_hessian: Tensor | None = None,
    light_hessian: Tensor | None = None,
) -> SplitFFN:
    """The SplitFFN of one FFN under its layer plan (computed in fp32 on the parts' device).

    `input_hessian` [H, H] (sum of x x^T of the FFN input) and `light_hessian` [l, l] (of the
    light neurons' activations a, plan order) are needed by GPTQ and by weighted low-rank.
    """
    size = parts.intermediate_size
    if layer.intermediate_size != size:
        raise CheckpointError(
            f"plan layer {layer.layer} covers {layer.intermediate_size} neurons, the FFN has {size}"
        )
    light = layer.light
    dtype = dense_dtype(layer.heavy_dtype)
    where = f"layer {layer.layer}"
    for name in ("up", "gate", "down", "up_bias", "gate_bias", "down_bias"):
        t = getattr(parts, name)
        if t is not None:
            check_finite(t, f"the FFN {name} weights of {where}")
    device = parts.up.device

    def indices(values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    int8_heavy = layer.heavy_dtype == "int8" and layer.n_heavy > 0
    dense_list = [] if layer.heavy_dtype == "int8" else list(layer.heavy_idx)
    if light.kind == "dense":
        dense_list += layer.light_idx
    dense_idx, light_idx = indices(dense_list), indices(layer.light_idx)
    compressed = light.kind in ("quant", "lowrank") and layer.n_light > 0
    if not dense_list and not compressed and not int8_heavy:
        raise OptionError(
            f"{where}: the plan keeps no neuron of this FFN: keep some heavy neurons "
            "(--heavy-fraction > 0) or choose a --light format that stores the light ones"
        )
    stored = stored_light(layer.n_light, light) if compressed else 0

    def dense(t: Tensor | None, dim: int = 0) -> Tensor | None:
        if t is None or not dense_list:
            return None
        return t.to(torch.float32).index_select(dim, dense_idx).to(dtype).contiguous()

    def neuron_bias(t: Tensor | None, index: Tensor, count: int) -> Tensor | None:
        if t is None:
            return None
        return _pad_vector(t.to(torch.float32).index_select(0, index), count).to(dtype)

    light_up = light_gate = light_down = None
    lowrank = None
    if compressed and light.kind == "quant":
        light_up, light_gate, light_down = _quantize_neurons(
            parts, light_idx, stored, light, input_hessian, light_hessian, where
        )
    elif compressed:
        if light.weighted and (input_hessian is None or light_hessian is None):
            raise OptionError(f"{where}: weighted low-rank needs calibration tokens (calib_ids)")
        rank = light.light_rank(layer.n_light, parts.hidden_size)

        def factorize(w: Tensor | None, dim: int, hessian: Tensor | None):
            if w is None:
                return None
            rows = w.to(torch.float32).index_select(dim, light_idx)
            return lowrank_factorize(
                rows, rank, hessian=hessian if light.weighted else None, dtype=dtype
            )

        lowrank = LowRankLight(
            up=factorize(parts.up, 0, input_hessian),
            gate=factorize(parts.gate, 0, input_hessian),
            down=factorize(parts.down, 1, light_hessian),
            up_bias=neuron_bias(parts.up_bias, light_idx, stored),
            gate_bias=neuron_bias(parts.gate_bias, light_idx, stored),
        )

    def main_bias(t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        pieces = [neuron_bias(t, dense_idx, len(dense_list))] if dense_list else []
        if light_up is not None:
            pieces.append(neuron_bias(t, light_idx, stored))
        return torch.cat(pieces) if pieces else None

    quantized_heavy = None
    if int8_heavy:
        heavy_idx = indices(layer.heavy_idx)
        padded = stored_heavy(layer.n_heavy, layer.n_light, light, "int8")
        up, gate, down = _quantize_neurons(
            parts, heavy_idx, padded, HEAVY_INT8, None, None, f"{where} heavy"
        )
        quantized_heavy = QuantizedHeavy(
            up=up,
            gate=gate,
            down=down,
            up_bias=neuron_bias(parts.up_bias, heavy_idx, padded),
            gate_bias=neuron_bias(parts.gate_bias, heavy_idx, padded),
        )
    weights = SplitFFNWeights(
        activation=parts.activation,
        gated=parts.gated,
        heavy_up=dense(parts.up),
        heavy_gate=dense(parts.gate),
        heavy_down=dense(parts.down, 1),
        light_up=light_up,
        light_gate=light_gate,
        light_down=light_down,
        up_bias=main_bias(parts.up_bias),
        gate_bias=main_bias(parts.gate_bias),
        down_bias=None if parts.down_bias is None else parts.down_bias.to(dtype),
    )
    return SplitFFN(
        weights,
        lowrank=lowrank,
        n_light=layer.n_light if compressed else 0,
        quantized_heavy=quantized_heavy,
        n_heavy=layer.n_heavy,
    )


def needs_calibration(light: LightFormat) -> bool:
    return (light.kind == "quant" and light.method == "gptq") or (
        light.kind == "lowrank" and light.weighted
    )


def _model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


class _LayerHessians:
    """Forward pre-hooks gathering one FFN's input and light-activation Hessians."""

    def __init__(self, block: FFNBlock, light_idx: list[int]) -> None:
        self.light_idx = light_idx
        self.index: Tensor | None = None
        self.x: HessianAccumulator | None = None
        self.a: HessianAccumulator | None = None
        self.handles = [
            block.up_input_module.register_forward_pre_hook(self._input),
            block.down_module.register_forward_pre_hook(self._activation),
        ]

    def _input(self, module: nn.Module, args: tuple) -> None:
        x = args[0]
        if self.x is None:
            self.x = HessianAccumulator(x.shape[-1], device=x.device)
        self.x.add(x)

    def _activation(self, module: nn.Module, args: tuple) -> None:
        a = args[0]
        if self.a is None:
            self.a = HessianAccumulator(len(self.light_idx), device=a.device)
            self.index = torch.tensor(self.light_idx, dtype=torch.long, device=a.device)
        self.a.add(a.index_select(-1, self.index))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def compress_model(
    model: nn.Module,
    plan: SplitPlan,
    *,
    calib_ids: Tensor | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> nn.Module:
    """Replace every FFN of `model` by the SplitFFN of `plan`, in place; returns the model.

    `calib_ids` [n_blocks, seq_len] (token ids) are needed by GPTQ and weighted low-rank light
    formats. Compression runs on `device` (default: where the model is); the new modules are
    put where the FFN's weights were.
    """
    check_plan(plan, model)
    blocks = get_ffn_blocks(model)
    total = len(blocks)
    report = progress or (lambda done, total: None)
    run_device = _model_device(model) if device is None else torch.device(device)
    calibrated = [needs_calibration(layer.light) for layer in plan.layers]
    if any(calibrated) and calib_ids is None:
        raise OptionError(
            "GPTQ and weighted low-rank light formats need calibration tokens: pass calib_ids"
        )

    # Where each FFN lives now: calibration moves one decoder layer at a time to `run_device`.
    homes = [block.down_module.weight.device for block in blocks]

    def compress(block: FFNBlock, hessians: _LayerHessians | None = None) -> None:
        parts = block.parts()
        moved = FFNParts(
            **{
                name: None if getattr(parts, name) is None else getattr(parts, name).to(run_device)
                for name in ("up", "gate", "down", "up_bias", "gate_bias", "down_bias")
            },
            activation=parts.activation,
        )
        layer = plan.layers[block.layer]
        input_hessian = light_hessian = None
        if hessians is not None:
            input_hessian = hessians.x.hessian.to(run_device)
            light_hessian = hessians.a.hessian.to(run_device)
        module = build_split_ffn(
            moved, layer, input_hessian=input_hessian, light_hessian=light_hessian
        )
        block.install(module.to(homes[block.layer]))

    if not any(calibrated):
        with torch.no_grad():
            for done, block in enumerate(blocks, 1):
                compress(block)
                report(done, total)
        return model

    if not isinstance(calib_ids, Tensor) or calib_ids.dim() != 2 or calib_ids.dtype != torch.long:
        raise OptionError("calibration input must be a LongTensor [n_blocks, seq_len]")
    if len(decoder_layers(model)) != total:
        raise OptionError("calibrated compression needs one FFN per decoder layer")
    batches = split_batches(calib_ids, batch_size)
    hooks = {
        block.layer: _LayerHessians(block, plan.layers[block.layer].light_idx)
        for block, needed in zip(blocks, calibrated, strict=True)
        if needed and plan.layers[block.layer].n_light > 0
    }
    done = 0

    def after_batch(index: int, layer: int | None) -> None:
        nonlocal done
        if index != len(batches) - 1:
            return
        hessians = hooks.pop(layer, None)
        if hessians is not None:
            hessians.remove()
        compress(blocks[layer], hessians)
        done += 1
        report(done, total)

    was_training = model.training
    model.eval()
    try:
        run_calibration(model, batches, device=run_device, sequential=True, after_batch=after_batch)
    finally:
        for hessians in hooks.values():
            hessians.remove()
        model.train(was_training)
    return model


def _activations(parts: FFNParts, x: Tensor, up: Tensor, gate: Tensor | None) -> Tensor:
    """a = act(gate x + b) * (up x + b) (or act(up x + b)) in fp32, for given up/gate weights."""
    u = F.linear(x, up, None if parts.up_bias is None else parts.up_bias.float())
    if gate is None:
        return apply_activation(parts.activation, u)
    gate_bias = None if parts.gate_bias is None else parts.gate_bias.float()
    return apply_activation(parts.activation, F.linear(x, gate, gate_bias)) * u


def _rtn_dequantized(w: Tensor, light: LightFormat) -> Tensor:
    """RTN of fp32 w [N, K] in format `light`, dequantized (compress.quant.rtn_dequantize)."""
    k = w.shape[1]
    return rtn_dequantize(w, light.bits, min(group_for(light, k), k), light.symmetric, SCALE_DTYPE)


def _layer_errors(
    parts: FFNParts, x: Tensor, grad: Tensor, formats: Sequence[LightFormat]
) -> NeuronErrors:
    """Per-neuron first-order loss errors of one FFN from inputs x and output gradients grad
    [T, H] (see measure_errors)."""
    up, down = parts.up.float(), parts.down.float()
    gate = None if parts.gate is None else parts.gate.float()
    a = _activations(parts, x, up, gate)
    reach = (grad @ down).square()  # (g_t . W_down[:, i])^2: how much a_i moves the loss
    size = down.shape[1]
    padded_down = F.pad(down, (0, -(-size // PACK_ALIGN) * PACK_ALIGN - size))
    errors: NeuronErrors = {"pruned": (a.square() * reach).mean(0).double().cpu()}
    for light in formats:
        if light.kind != "quant":
            raise OptionError(f"measure_errors measures quant formats, not {light.label()}")
        rtn = replace(light, method="rtn")
        gate_q = None if gate is None else _rtn_dequantized(gate, rtn)
        a_q = _activations(parts, x, _rtn_dequantized(up, rtn), gate_q)
        down_q = _rtn_dequantized(padded_down, rtn)[:, :size]
        up_error = ((a_q - a).square() * reach).mean(0)
        down_error = (a * (grad @ (down - down_q))).square().mean(0)
        errors[light.label()] = (up_error + down_error).double().cpu()
    return errors


def _ffn_inputs_and_gradients(
    model: nn.Module, blocks: list[FFNBlock], ids: Tensor, batch_size: int, seed: int
) -> tuple[list[Tensor], list[Tensor]]:
    """Per FFN, its inputs x and the gradients g of the loss w.r.t. its output, [T, H] fp32.

    Causal LMs: the loss is the log-likelihood of next tokens sampled from the model itself
    (so E[(g . d)^2] / 2 is the Fisher estimate of the KL a perturbation d causes); encoders:
    a fixed random projection of the last hidden state (E[(g . d)^2] = the squared change of
    the output). Only activations get gradients: parameters are frozen meanwhile.
    """
    inputs: list[list[Tensor]] = [[] for _ in blocks]
    grads: list[list[Tensor]] = [[] for _ in blocks]

    def keep_input(layer: int):
        def hook(module: nn.Module, args: tuple) -> None:
            inputs[layer].append(args[0].detach().reshape(-1, args[0].shape[-1]).float())

        return hook

    def keep_grad(layer: int):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            output.register_hook(
                lambda g: grads[layer].append(g.detach().reshape(-1, g.shape[-1]).float())
            )

        return hook

    def track(module: nn.Module, args: tuple, output: Tensor) -> None:
        output.requires_grad_()

    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    handles = [embeddings.register_forward_hook(track)]
    for block in blocks:
        handles.append(block.up_input_module.register_forward_pre_hook(keep_input(block.layer)))
        handles.append(block.down_module.register_forward_hook(keep_grad(block.layer)))
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    try:
        for param, _ in frozen:
            param.requires_grad_(False)
        for batch in split_batches(ids, batch_size):
            with torch.enable_grad():
                out = model(input_ids=batch.to(device))
                logits = getattr(out, "logits", None)
                if logits is not None:
                    flat = logits.float().reshape(-1, logits.shape[-1])
                    probs = torch.softmax(flat.detach(), dim=-1)
                    labels = torch.multinomial(probs, 1, generator=generator).flatten()
                    loss = F.cross_entropy(flat, labels, reduction="sum")
                else:
                    hidden = out.last_hidden_state.float()
                    probe = torch.randn(
                        hidden.shape, generator=generator, device=device, dtype=hidden.dtype
                    )
                    loss = (hidden * probe).sum()
                loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for param, flag in frozen:
            param.requires_grad_(flag)
        model.train(was_training)
    return [torch.cat(x) for x in inputs], [torch.cat(g) for g in grads]


def measure_errors(
    model: nn.Module,
    calib_ids: Tensor,
    formats: Sequence[LightFormat] | None = None,
    *,
    max_tokens: int = 1024,
    batch_size: int = 1,
    seed: int = 0,
    progress: Progress | None = None,
) -> list[NeuronErrors]:
    """Per layer and format, each neuron's estimated contribution to the model's output error,
    for plan_for_budget(neuron_errors=...).

    On the first blocks of `calib_ids` [n_blocks, seq_len] holding `max_tokens` tokens, one
    forward and backward pass records every FFN's inputs x_t and the gradient g_t of the loss
    w.r.t. its output (`_ffn_inputs_and_gradients`). For every format (default: those of the
    default budget candidates) the up, gate and down weights are RTN-quantized and neuron i's
    error is the first-order (Fisher) estimate of the loss change its quantization causes,

        E_t[ (dA_ti (g_t . W_down[:, i]))^2 + (a_ti (g_t . dW_down[:, i]))^2 ]

    with a_ti its activation, dA_ti the change of it under quantized up/gate rows and dW_down
    the down column's quantization error; "pruned" holds E_t[(a_ti (g_t . W_down[:, i]))^2].
    One unit across all layers (how much the model's predictions move), so layers of any scale
    and sensitivity compare directly. Runs where the model is; memory: inputs and gradients of
    every FFN for `max_tokens` tokens.
    """
    formats = candidate_formats(default_candidates()) if formats is None else formats
    if not isinstance(calib_ids, Tensor) or calib_ids.dim() != 2 or calib_ids.dtype != torch.long:
        raise OptionError("calibration input must be a LongTensor [n_blocks, seq_len]")
    report = progress or (lambda done, total: None)
    blocks = get_ffn_blocks(model)
    ids = calib_ids[: max(1, -(-max_tokens // calib_ids.shape[1]))]
    inputs, grads = _ffn_inputs_and_gradients(model, blocks, ids, batch_size, seed)
    results = []
    with torch.no_grad():
        for block in blocks:
            x, g = inputs[block.layer], grads[block.layer]
            inputs[block.layer] = grads[block.layer] = None  # free as we go
            results.append(_layer_errors(block.parts(), x, g, formats))
            report(len(results), len(blocks))
    return results
