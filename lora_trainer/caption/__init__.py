"""Captioning folders with BLIP, and reviewing and editing the captions."""

from lora_trainer.caption.blip import CaptionError, CaptionResult, caption_folder, load_blip
from lora_trainer.caption.store import edit_caption, list_captions, replace_in_captions, tag_table

__all__ = ["CaptionError", "CaptionResult", "caption_folder", "edit_caption", "list_captions", "load_blip",
           "replace_in_captions", "tag_table"]
