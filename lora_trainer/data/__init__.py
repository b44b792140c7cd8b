"""Finding, validating and preparing training images and captions."""

from lora_trainer.data.buckets import make_buckets, nearest_bucket, resize_and_crop
from lora_trainer.data.captions import process_caption, split_tags, tag_frequency
from lora_trainer.data.images import (
    IMAGE_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    DatasetScan,
    ImageItem,
    load_image,
    scan_dataset,
    scan_images,
    to_rgb,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "DatasetScan",
    "ImageItem",
    "load_image",
    "make_buckets",
    "nearest_bucket",
    "process_caption",
    "resize_and_crop",
    "scan_dataset",
    "scan_images",
    "split_tags",
    "tag_frequency",
    "to_rgb",
]
