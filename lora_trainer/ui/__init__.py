"""The LoRA Train UI: Gradio Blocks shared by the WebUI tab and the standalone app, and the job runner behind them.

`blocks` imports gradio; `jobs` and `render` do not, so the API routes and ComfyUI use them without it.
"""
