"""convlora: exact low-rank adapters (ConvLoRA) for convolutional networks.

Inject adapters into a trained model's convolutions, train only them (optionally distilling from
a teacher with `convlora.distill`), then merge them back: the deployed model has exactly the
original architecture, parameter count and speed.
"""

from . import distill
from ._version import __version__
from .adapter_format import read_adapter
from .adapters import load_adapter, save_adapter
from .composition import combine_adapters, per_sample, scaled
from .config import LoRAConfig
from .errors import (
    AdapterFormatError,
    AdapterMismatchError,
    ConvLoRAError,
    FingerprintMismatchError,
    MergeStateError,
    StateDictError,
    TargetError,
    UnsupportedLayerError,
)
from .extraction import Extraction, KeyDifference, LayerExtraction, extract, extract_file
from .layer import LoRALayer
from .management import (
    active_adapter,
    delete_adapter,
    list_adapters,
    lora_parameters,
    lora_state_dict,
    set_adapter,
    summary,
)
from .merge import disabled, is_merged, merge, merged, unmerge
from .peft import load_peft_adapter, save_peft_adapter
from .state_dict import load_state_dict, merge_state_dict, save_state_dict
from .surgery import find_targets, inject, lora_layers, unload
from .trainable import mark_only_lora_trainable
from .verification import verify

__all__ = [
    "AdapterFormatError",
    "AdapterMismatchError",
    "ConvLoRAError",
    "Extraction",
    "FingerprintMismatchError",
    "KeyDifference",
    "LayerExtraction",
    "LoRAConfig",
    "LoRALayer",
    "MergeStateError",
    "StateDictError",
    "TargetError",
    "UnsupportedLayerError",
    "__version__",
    "active_adapter",
    "combine_adapters",
    "delete_adapter",
    "disabled",
    "distill",
    "extract",
    "extract_file",
    "find_targets",
    "inject",
    "is_merged",
    "list_adapters",
    "load_adapter",
    "load_peft_adapter",
    "load_state_dict",
    "lora_layers",
    "lora_parameters",
    "lora_state_dict",
    "mark_only_lora_trainable",
    "merge",
    "merge_state_dict",
    "merged",
    "per_sample",
    "read_adapter",
    "save_adapter",
    "save_peft_adapter",
    "save_state_dict",
    "scaled",
    "set_adapter",
    "summary",
    "unload",
    "unmerge",
    "verify",
]
