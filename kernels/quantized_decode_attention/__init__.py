"""Decode attention over quantised KV slots (KIVI codes): a Pallas kernel (GPU / TPU, interpret mode on the
CPU), an XLA path on the codes and a dense float32 reference; and the code format they read."""

from kernels.quantized_decode_attention.api import DECODE_BACKENDS, quantized_decode_attention, quantized_partials
from kernels.quantized_decode_attention.codes import (CODE_BITS, codes_per_byte, dequantize_keys, dequantize_values,
                                                      pack_codes, phase_merge, phase_split, unpack_codes)
from kernels.quantized_decode_attention.pallas import pallas_partials
from kernels.quantized_decode_attention.partials import Partials, dense_partials, merge_partials, normalize
from kernels.quantized_decode_attention.reference import reference_partials
from kernels.quantized_decode_attention.slots import QuantizedSlots
from kernels.quantized_decode_attention.xla import xla_partials

__all__ = ["CODE_BITS", "DECODE_BACKENDS", "Partials", "QuantizedSlots", "codes_per_byte", "dense_partials",
           "dequantize_keys", "dequantize_values", "merge_partials", "normalize", "pack_codes", "pallas_partials",
           "phase_merge", "phase_split", "quantized_decode_attention", "quantized_partials", "reference_partials",
           "unpack_codes", "xla_partials"]
