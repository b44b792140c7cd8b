"""ComfyUI entry point: this repository cloned into ComfyUI/custom_nodes/ is the LoRA Trainer node pack.

The nodes live in lora_trainer/hosts/comfyui.py; this file only makes the package importable from here.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from lora_trainer.hosts.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
