"""Stable Diffusion WebUI (AUTOMATIC1111, Forge) entry: adds the "LoRA Train" tab, its settings and API routes.

The WebUI imports this file with the extension folder on sys.path; everything lives in the lora_trainer
package (imported here, so it stays importable after the WebUI restores sys.path).
"""

from lora_trainer.hosts import a1111

a1111.register()
