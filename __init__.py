"""ComfyUI entry point: this repository cloned into ComfyUI/custom_nodes/ is the LoRA Trainer node pack.

The nodes live in lora_trainer/hosts/comfyui.py; this file only makes the package importable from here.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from lora_trainer.hosts.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, register_routes

register_routes()  # Save now / Sample now, which the Train LoRA node's buttons call
WEB_DIRECTORY = "./web"  # the node's buttons (web/lora_trainer_nodes.js); the WebUI reads javascript/ instead

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
