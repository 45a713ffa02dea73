"""QLoRA's 4-bit frozen base: the precision plugin, the low-memory loader, LoftQ, and FSDP2-shardable 4-bit weights.

bitsandbytes is imported lazily: importing this package works without it, using the plugin does not.
"""

from lightning_zenft.precision.export import save_base
from lightning_zenft.precision.fabric import FabricNF4Precision
from lightning_zenft.precision.loader import load_pretrained_4bit
from lightning_zenft.precision.loftq import apply_loftq, loftq_decompose
from lightning_zenft.precision.plugin import NF4Precision
from lightning_zenft.precision.quantize import QuantSpec, dequantize, quantize_weight, to_linear4bit
from lightning_zenft.precision.resume import check_resume_precision
from lightning_zenft.precision.select import plan_quantization
from lightning_zenft.precision.sharded import Packed4bitTensor
from lightning_zenft.precision.sharded_linear import ShardedLinear4bit, make_shardable

__all__ = [
    "FabricNF4Precision",
    "NF4Precision",
    "Packed4bitTensor",
    "QuantSpec",
    "ShardedLinear4bit",
    "apply_loftq",
    "check_resume_precision",
    "dequantize",
    "load_pretrained_4bit",
    "loftq_decompose",
    "make_shardable",
    "plan_quantization",
    "quantize_weight",
    "save_base",
    "to_linear4bit",
]
