"""Adapters: LoRA (float and packed bases: QLoRA) and prompt tuning as in-place verbs, their merge, and
PEFT-format adapter folders. Built on the core; importing this package teaches the loader to read adapter
folders (loader.FOLDER_READERS), so a MODEL argument may be one."""

from .. import loader
from .files import is_adapter_folder, load_adapted, load_adapter_, save_adapter
from .lora import (LoRAConfig, LoRALinear, adapter_parameters, apply_lora_, lora_modules, merge_lora_, refuse_adapted,
                   targets)
from .prompt import PromptTuningConfig, apply_prompt_tuning_

if (is_adapter_folder, load_adapted) not in loader.FOLDER_READERS:
    loader.FOLDER_READERS.append((is_adapter_folder, load_adapted))

__all__ = ["LoRAConfig", "LoRALinear", "PromptTuningConfig", "adapter_parameters", "apply_lora_",
           "apply_prompt_tuning_", "is_adapter_folder", "load_adapted", "load_adapter_", "lora_modules",
           "merge_lora_", "refuse_adapted", "save_adapter", "targets"]
