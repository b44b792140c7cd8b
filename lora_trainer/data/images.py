"""Finding training images and their captions, and loading each image as 8-bit RGB."""

from __future__ import annotations

import codecs
import csv
import json
import logging
import os
import random
import re
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lora_trainer.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MAX_IMAGE_PIXELS = 200_000_000
MISSING_CAPTION_MODES = ("empty", "trigger", "error")

_REPEAT_FOLDER = re.compile(r"^([1-9][0-9]*)_.+")
_METADATA_FILES = ("metadata.csv", "metadata.jsonl")
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_HIGH_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
_MODE_NAMES = {
    "CMYK": "CMYK converted to RGB",
    "P": "palette converted to RGB",
    "L": "grayscale converted to RGB",
    "1": "1-bit black and white converted to RGB",
}
_LISTED = 10
# control characters other than tab, newline and carriage return: a file holding them is not a caption
_NOT_TEXT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# What Pillow's decoders raise on damaged data (Pillow itself treats the same types as "not this format").
_DECODE_ERRORS = (
    OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error, Image.DecompressionBombError
)


@dataclass
class ImageItem:
    """One usable training image: its caption, repeat count and size after EXIF rotation; `held_out` images are
    never trained on, only measured (the validation set)."""

    path: Path
    caption: str
    repeats: int
    width: int
    height: int
    held_out: bool = False


@dataclass
class DatasetScan:
    """What a scan of a training folder found: usable images and every file it set aside or changed."""

    items: list[ImageItem] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    converted: list[tuple[Path, str]] = field(default_factory=list)
    uncaptioned: list[Path] = field(default_factory=list)

    @property
    def training(self) -> list[ImageItem]:
        """The items that train (all but the held-out ones)."""
        return [item for item in self.items if not item.held_out]

    def summary(self) -> str:
        """A few readable lines: counts, then the first skipped files with their reasons."""
        training = self.training
        steps = sum(item.repeats for item in training)
        held = len(self.items) - len(training)
        lines = [
            (
                f"{len(training)} usable images ({steps} per epoch with repeats), "
                + (f"{held} held out for validation, " if held else "")
                + f"{len(self.skipped)} skipped, {len(self.converted)} converted, "
                f"{len(self.uncaptioned)} without caption"
            )
        ]
        lines += [f"  skipped {path}: {reason}" for path, reason in self.skipped[:_LISTED]]
        if len(self.skipped) > _LISTED:
            lines.append(f"  ... and {len(self.skipped) - _LISTED} more skipped")
        return "\n".join(lines)


class _Unusable(Exception):
    """An image file that cannot be trained on; the message is the reason, in the user's words."""


class UnusableImage(DatasetError):
    """An image file that cannot be used; `reason` says why in the user's words (without the path)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"Cannot use image {path}: {reason}. Replace the file or remove it from the folder.")
        self.reason = reason


def to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """Convert a decoded image to 8-bit RGB and say what was changed (None when it was RGB already)."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image, None
    if mode in _HIGH_BIT_MODES:
        depth = "16-bit" if mode.startswith("I;16") else "32-bit"
        return _scale_to_8bit(image).convert("RGB"), f"{depth} scaled to 8-bit"
    if mode in _ALPHA_MODES or "transparency" in image.info:
        what = "palette with transparency" if mode in ("P", "PA") else "alpha"
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB"), f"{what} composited on white"
    return image.convert("RGB"), _MODE_NAMES.get(mode, f"{mode} converted to RGB")


def load_image(path: Path) -> Image.Image:
    """Open an image file as upright 8-bit RGB, or raise DatasetError saying why it cannot be used."""
    try:
        return _read_image(Path(path))[0]
    except _Unusable as err:
        raise UnusableImage(path, str(err)) from None


def scan_dataset(
    folder: str | Path,
    *,
    caption_extension: str = ".txt",
    missing_caption: str = "empty",
    trigger_word: str = "",
    default_repeats: int = 1,
    min_size: int = 64,
) -> DatasetScan:
    """Find, validate and caption every image in a training folder (flat or kohya `N_name` layout)."""
    if missing_caption not in MISSING_CAPTION_MODES:
        raise ConfigError(f"missing_caption is {missing_caption!r}; use one of {', '.join(MISSING_CAPTION_MODES)}.")
    if default_repeats < 1:
        raise ConfigError(f"default_repeats is {default_repeats}; use 1 or more.")
    if not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    root = Path(folder).expanduser().absolute()
    if not root.exists():
        raise DatasetError(f"Training folder {root} does not exist. Check the path and try again.")
    if not root.is_dir():
        raise DatasetError(f"{root} is a file, not a folder. Point the trainer at the folder that holds the images.")

    candidates = sorted(_find_images(root, default_repeats))
    if not candidates:
        raise DatasetError(
            f"No images found in {root}. Looked for {', '.join(sorted(IMAGE_EXTENSIONS))} files in the folder "
            "and its sub-folders (kohya repeat folders such as 10_name/ are supported). "
            "Put the training images there or choose another folder."
        )
    metadata = _read_metadata(root)
    fallback = _with_trigger(trigger_word.strip() if missing_caption == "trigger" else "", trigger_word)
    scan = DatasetScan()
    disagreeing: list[Path] = []
    # Decoders release the GIL, so threads check a large folder several times faster.
    with ThreadPoolExecutor() as pool:
        checks = list(pool.map(_check_image, (path for path, _ in candidates)))
    for (path, repeats), ((width, height), note, problem) in zip(candidates, checks):
        if problem is None and min(width, height) < min_size:
            problem = f"too small: {width}x{height}, shorter side under {min_size} px"
        if problem is not None:
            scan.skipped.append((path, problem))
            continue
        try:
            sidecar = _sidecar_caption(path, caption_extension)
        except _Unusable as err:
            scan.skipped.append((path, str(err)))
            continue
        if note:
            scan.converted.append((path, note))
        listed = metadata.get(_key(path), "")
        if sidecar and listed and sidecar != listed:
            disagreeing.append(path)
        caption = sidecar or listed
        if not caption:
            scan.uncaptioned.append(path)
            caption = fallback
        scan.items.append(ImageItem(path, _with_trigger(caption, trigger_word), repeats, width, height))

    if not scan.items:
        raise DatasetError(f"None of the {len(candidates)} images in {root} can be used.\n{scan.summary()}\n"
                           "Fix or replace these files, then scan again.")
    if scan.uncaptioned and missing_caption == "error":
        listed = ", ".join(str(path) for path in scan.uncaptioned[:_LISTED])
        more = f" and {len(scan.uncaptioned) - _LISTED} more" if len(scan.uncaptioned) > _LISTED else ""
        raise DatasetError(
            f"{len(scan.uncaptioned)} images in {root} have no caption: {listed}{more}. Add a {caption_extension} "
            "file with the same name next to each image or a metadata.csv entry, or set missing_caption "
            "to 'empty' or 'trigger'."
        )
    for path, reason in scan.skipped:
        logger.warning("Skipped %s: %s", path, reason)
    if disagreeing:
        listed = ", ".join(path.name for path in disagreeing[:3]) + (" ..." if len(disagreeing) > 3 else "")
        logger.warning("%d images have a caption file and a different metadata.csv/jsonl caption (%s); the caption "
                       "files are used. Delete those caption files to train on the metadata captions.",
                       len(disagreeing), listed)
    if scan.uncaptioned:
        logger.warning("%d images have no caption and train on %r", len(scan.uncaptioned), fallback)
    logger.info("Scanned %s: %s", root, scan.summary().splitlines()[0])
    return scan


def scan_images(config) -> DatasetScan:
    """The training images of a TrainConfig and its validation images, in one scan: `validation_dir`'s images
    appended, or a seeded `validation_split` share of the training folder's, marked `held_out` (at least one when
    the share is above 0, never all). Raises DatasetError for a folder that gives nothing, or that gives both."""
    scan = scan_dataset(config.train_data_dir, caption_extension=config.caption_extension,
                        missing_caption=config.missing_caption, trigger_word=config.trigger_word, default_repeats=1)
    if config.validation_dir.strip():
        if Path(config.validation_dir).expanduser().absolute() == Path(config.train_data_dir).expanduser().absolute():
            raise DatasetError(f"validation_dir is the training folder ({config.validation_dir}): validation images must "
                               "be ones the LoRA never trains on. Use another folder, or validation_split.")
        held = scan_dataset(config.validation_dir, caption_extension=config.caption_extension,
                            missing_caption=config.missing_caption, trigger_word=config.trigger_word)
        training = {item.path.resolve() for item in scan.items}
        both = [item.path for item in held.items if item.path.resolve() in training]
        if both:
            raise DatasetError(f"validation_dir {config.validation_dir} lies inside the training folder: {both[0]} would "
                               "be trained on and measured. Move the validation images out of the training folder.")
        for item in held.items:
            item.held_out, item.repeats = True, 1
        scan.items += held.items
        scan.skipped += held.skipped
        scan.converted += held.converted
        scan.uncaptioned += held.uncaptioned
    elif config.validation_split:
        if len(scan.items) < 2:
            raise DatasetError(f"validation_split {config.validation_split:g} needs at least 2 images (one to train on, "
                               f"one to hold out); {config.train_data_dir} has {len(scan.items)}. Add images, give a "
                               "validation_dir, or set validation_split: 0.")
        count = min(max(round(len(scan.items) * config.validation_split), 1), len(scan.items) - 1)
        for index in random.Random(config.seed).sample(range(len(scan.items)), count):
            scan.items[index].held_out = True
    return scan


def _read_image(path: Path) -> tuple[Image.Image, str | None]:
    """Decode a whole image file, upright and as RGB, with the conversion note; raise _Unusable if it cannot be."""
    try:
        empty = path.stat().st_size == 0
    except OSError as err:
        raise _Unusable(f"cannot be read ({err})") from None
    if empty:
        raise _Unusable("empty file (0 bytes)")
    try:
        image = Image.open(path)
    except UnidentifiedImageError:
        raise _Unusable("not an image, or damaged beyond recognition") from None
    except Image.DecompressionBombError as err:
        raise _Unusable(f"too large: {err}") from None
    except OSError as err:
        raise _Unusable(f"cannot be opened ({err})") from None
    with image:
        width, height = image.size
        # Hosts often switch off Pillow's own decompression-bomb check; ours still holds.
        if width * height > MAX_IMAGE_PIXELS:
            raise _Unusable(
                f"too large: {width}x{height} is over the {MAX_IMAGE_PIXELS / 1e6:g} megapixel limit"
            )
        try:
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
        except _DECODE_ERRORS as err:
            raise _Unusable(f"truncated, corrupt or unsupported ({err})") from None


def _check_image(path: Path) -> tuple[tuple[int, int], str | None, str | None]:
    """One image's upright size, its conversion note, and the reason it is unusable (None if usable)."""
    try:
        image, note = _read_image(path)
    except _Unusable as err:
        return (0, 0), None, str(err)
    return image.size, note, None


def _scale_to_8bit(image: Image.Image) -> Image.Image:
    """Map a 16-bit, 32-bit or float image onto 0-255 over its full range rather than clipping it."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    low, high = 0.0, 65535.0
    if not image.mode.startswith("I;16"):
        # "I" and "F" carry no nominal range: take the smallest usual one that holds the data.
        data_low, data_high = float(values.min()), float(values.max())
        if data_low < 0 or data_high > 65535:
            low, high = data_low, max(data_high, data_low + 1)
        elif image.mode == "F" and data_high <= 1:
            high = 1.0
        elif data_high <= 255:
            high = 255.0
    scaled = np.rint((values - low) * (255.0 / (high - low)))
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8))


def _find_images(root: Path, default_repeats: int) -> Iterator[tuple[Path, int]]:
    """Every image file under root with its repeat count from the nearest `N_name` folder."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [name for name in dirnames if not name.startswith(".")]
        folder = Path(dirpath)
        repeats = default_repeats
        for part in folder.relative_to(root).parts:
            match = _REPEAT_FOLDER.match(part)
            if match:
                repeats = int(match.group(1))
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                yield folder / name, repeats


def _key(path: Path) -> str:
    """A normalised path string, so metadata entries and found files compare equal."""
    return os.path.normcase(os.path.normpath(path))


def _decode_text(path: Path) -> str:
    """A text file's contents: UTF-8 (BOM or not), UTF-16 with a BOM, else Windows-1252 (what older Windows
    editors save) with a warning naming the file; _Unusable when it cannot be read or is not text at all."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise _Unusable(f"cannot be read ({err.strerror})") from None
    legacy = False
    try:
        text = data.decode("utf-16" if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig")
    except UnicodeDecodeError:
        text, legacy = data.decode("cp1252", errors="replace"), True
    if _NOT_TEXT.search(text) or legacy and "\ufffd" in text:
        raise _Unusable("is not text (binary data or an unknown encoding); save it as UTF-8 text or remove it")
    if legacy:
        logger.warning("%s is not UTF-8; read it as Windows-1252: %r. Save it as UTF-8 if that looks wrong.",
                       path, text.strip()[:80])
    return text


def _read_text(path: Path) -> str:
    """A text file's contents (see _decode_text), or DatasetError naming the file."""
    try:
        return _decode_text(path)
    except _Unusable as err:
        raise DatasetError(f"Cannot read {path}: it {err}.") from None


def sidecar_files(image_path: Path, caption_extension: str = ".txt") -> list[Path]:
    """The caption files beside an image, in the order training reads them (before metadata.csv/jsonl)."""
    extensions = dict.fromkeys((caption_extension, ".caption", ".txt"))
    return [path for path in (image_path.parent / (image_path.stem + e) for e in extensions) if path.is_file()]


def _sidecar_caption(image_path: Path, caption_extension: str) -> str:
    """The first non-empty caption among `<stem><caption_extension>`, `<stem>.caption` and `<stem>.txt`;
    _Unusable (naming the file) when that file is not text."""
    for sidecar in sidecar_files(image_path, caption_extension):
        try:
            caption = _decode_text(sidecar).strip()
        except _Unusable as err:
            raise _Unusable(f"its caption file {sidecar.name} {err}") from None
        if caption:
            return caption
    return ""


def _read_metadata(root: Path) -> dict[str, str]:
    """Non-empty captions from every `metadata.csv` / `metadata.jsonl` under root, keyed by image path."""
    captions: dict[str, str] = {}
    for metadata in sorted(root.rglob("metadata.*")):
        if metadata.name not in _METADATA_FILES or not metadata.is_file():
            continue
        rows = _csv_rows(metadata) if metadata.suffix == ".csv" else _jsonl_rows(metadata)
        for file_name, text in rows:
            if text.strip():
                captions.setdefault(_key(metadata.parent / file_name), text.strip())
    return captions


def _csv_rows(path: Path) -> list[tuple[str, str]]:
    """(file_name, text) rows of a metadata.csv."""
    reader = csv.DictReader(_read_text(path).splitlines())
    if not {"file_name", "text"} <= set(reader.fieldnames or ()):
        raise DatasetError(f"{path} needs a header row with file_name and text columns; add it or remove the file.")
    return [(row["file_name"] or "", row["text"] or "") for row in reader if row["file_name"]]


def _jsonl_rows(path: Path) -> list[tuple[str, str]]:
    """(file_name, text) rows of a metadata.jsonl."""
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path} line {number} is not valid JSON ({err}); fix or remove that line.") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
            raise DatasetError(f"{path} line {number} needs an object with file_name and text; fix or remove it.")
        text = entry.get("text")
        rows.append((entry["file_name"], text if isinstance(text, str) else ""))
    return rows


def _with_trigger(caption: str, trigger_word: str) -> str:
    """The caption with the trigger word in front, unless it is already one of its comma-separated tags."""
    trigger = trigger_word.strip()
    if not trigger:
        return caption
    tags = [tag.strip().casefold() for tag in caption.split(",")]
    if trigger.casefold() in tags:
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def find_images(folder: str | Path) -> list[Path]:
    """Every image file under `folder` (sorted), the ones training and captioning look at."""
    root = Path(folder).expanduser().absolute()
    if not root.is_dir():
        raise DatasetError(f"Image folder {root} does not exist or is not a folder. Check the path and try again.")
    return sorted(path for path, _ in _find_images(root, 1))


def current_captions(folder: str | Path, images: list[Path], caption_extension: str = ".txt") -> dict[Path, str]:
    """The caption each image has now (sidecar file first, then metadata.csv/jsonl); uncaptioned ones are absent."""
    metadata = _read_metadata(Path(folder).expanduser().absolute())
    found = {}
    for path in images:
        try:
            caption = _sidecar_caption(path, caption_extension) or metadata.get(_key(path), "")
        except _Unusable as err:
            logger.warning("%s has no usable caption: %s", path, err)
            continue
        if caption:
            found[path] = caption
    return found
