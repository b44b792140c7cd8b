"""The LoRA Train UI: Gradio Blocks shared by the WebUI tab and the standalone app.

`blocks` imports gradio; `render` does not, so ComfyUI uses it without gradio.
"""
