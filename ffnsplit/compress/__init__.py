"""Light-part formats: group quantization (RTN, GPTQ), low-rank factors, structured pruning."""

from ffnsplit.compress.gptq import HessianAccumulator, quantize_gptq
from ffnsplit.compress.lowrank import LowRank, lowrank_factorize, rank_for_budget
from ffnsplit.compress.prune import prune_order, select_pruned
from ffnsplit.compress.quant import (
    bits_per_weight,
    quantization_error,
    quantize_rtn,
    quantized_nbytes,
    rtn_dequantize,
    validate_quant_options,
)

__all__ = [
    "HessianAccumulator",
    "LowRank",
    "bits_per_weight",
    "lowrank_factorize",
    "prune_order",
    "quantization_error",
    "quantize_gptq",
    "quantize_rtn",
    "quantized_nbytes",
    "rank_for_budget",
    "rtn_dequantize",
    "select_pruned",
    "validate_quant_options",
]
