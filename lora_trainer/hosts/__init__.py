"""Adapters from a host's objects and events to the engine's: the command line now, the WebUI and ComfyUI next."""
