"""Model merging: adapters into the base (4-bit bases too, streamed from shards), task arithmetic, TIES, DARE.

* tensor level (``peft.utils.merge_utils``' names and argument order): :func:`task_arithmetic`, :func:`ties`,
  :func:`dare_linear`, :func:`dare_ties`, :func:`magnitude_prune`, and :func:`magnitude_threshold` /
  :class:`GlobalMagnitudeThreshold` for trimming over a whole task vector;
* saved models: :func:`merge_pretrained` merges adapters, or N fine-tunes, into a base directory (dense, or 4-bit and
  dequantized), tensor by tensor;
  :func:`combine_adapters` combines LoRA adapters into one adapter (on the products with an SVD back to rank ``r``,
  or on A and B as PEFT does);
* models in memory: :func:`export_merged` writes the merged model without changing it; :func:`merge_and_unload`
  merges in place; :func:`merge_into_4bit` merges one adapter layer into its 4-bit base (the error returned);
* :func:`load_adapter_layers`: an adapter file as mergeable layers, without the base model.

The ``MergeAdapters`` callback and ``zenft merge`` are built on these.
"""

from lightning_zenft.adapters._bnb import dequantize_4bit_weight
from lightning_zenft.merging.adapter_files import AdapterFile, load_adapter_layers
from lightning_zenft.merging.adapters import adapted_weight, merge_and_unload
from lightning_zenft.merging.export import ExportReport, export_merged
from lightning_zenft.merging.lora_combine import (
    CombineReport,
    combine_adapters,
    combine_lora_factors,
    combine_lora_products,
    low_rank,
)
from lightning_zenft.merging.pretrained import MergeReport, merge_pretrained
from lightning_zenft.merging.quantized import QuantizationError, merge_into_4bit
from lightning_zenft.merging.task_vectors import (
    METHODS,
    GlobalMagnitudeThreshold,
    dare_linear,
    dare_ties,
    magnitude_prune,
    magnitude_threshold,
    merge_task_tensors,
    task_arithmetic,
    ties,
)

__all__ = [
    "METHODS",
    "AdapterFile",
    "CombineReport",
    "ExportReport",
    "GlobalMagnitudeThreshold",
    "MergeReport",
    "QuantizationError",
    "adapted_weight",
    "combine_adapters",
    "combine_lora_factors",
    "combine_lora_products",
    "dare_linear",
    "dare_ties",
    "dequantize_4bit_weight",
    "export_merged",
    "load_adapter_layers",
    "low_rank",
    "magnitude_prune",
    "magnitude_threshold",
    "merge_and_unload",
    "merge_into_4bit",
    "merge_pretrained",
    "merge_task_tensors",
    "task_arithmetic",
    "ties",
]
