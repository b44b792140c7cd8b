"""Where captions live and how they change: sidecar files or metadata.csv/jsonl, always written atomically.

Also the review tools the WebUI tab and the ComfyUI node show: the caption of every image, editing one,
find/replace across a folder, and the tag frequency table.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from pathlib import Path

from lora_trainer.atomic import replaced_atomically
from lora_trainer.data.captions import split_tags
from lora_trainer.data.images import current_captions, find_images
from lora_trainer.errors import DatasetError

METADATA_FILES = {"csv": "metadata.csv", "jsonl": "metadata.jsonl"}


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one step: readers see the old file or the new one, never half of one."""
    try:
        with replaced_atomically(path) as tmp:
            tmp.write_text(text, encoding="utf-8", newline="")
    except OSError as exc:
        raise DatasetError(f"Cannot write {path} ({exc.strerror}); the previous file, if any, is intact.") from None


class CaptionWriter:
    """Writes captions as sidecar files or into the folder's metadata.csv / metadata.jsonl."""

    def __init__(self, folder: Path, output: str = "txt", caption_extension: str = ".txt") -> None:
        self.folder = Path(folder).expanduser().absolute()
        self.output = output
        self.extension = caption_extension if caption_extension.startswith(".") else "." + caption_extension
        self.metadata_file = self.folder / METADATA_FILES[output] if output in METADATA_FILES else None
        self.rows: dict[str, dict[str, str]] = self._read_rows() if self.metadata_file else {}

    def sidecar(self, image: Path) -> Path:
        """The caption file of an image."""
        return image.with_suffix(self.extension)

    def write(self, captions: dict[Path, str]) -> None:
        """Store these captions (a batch) durably before returning."""
        if self.metadata_file is None:
            for image, text in captions.items():
                write_text_atomic(self.sidecar(image), text + "\n")
            return
        for image, text in captions.items():
            name = image.relative_to(self.folder).as_posix()
            self.rows.setdefault(name, {"file_name": name})["text"] = text
        write_text_atomic(self.metadata_file, self._render())

    def _read_rows(self) -> dict[str, dict[str, str]]:
        """The metadata file's rows by file name, keeping any extra columns a user added."""
        if not self.metadata_file.is_file():
            return {}
        text = self.metadata_file.read_text(encoding="utf-8-sig")
        if self.output == "csv":
            rows = list(csv.DictReader(io.StringIO(text)))
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        return {row["file_name"]: row for row in rows if row.get("file_name")}

    def _render(self) -> str:
        """The whole metadata file as text."""
        rows = [self.rows[name] for name in sorted(self.rows)]
        if self.output == "jsonl":
            return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        columns = ["file_name", "text"] + sorted({k for row in rows for k in row} - {"file_name", "text"})
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()


def list_captions(folder: str | Path, caption_extension: str = ".txt") -> list[tuple[Path, str]]:
    """Every image of the folder with its current caption ('' where it has none)."""
    images = find_images(folder)
    captions = current_captions(folder, images, caption_extension)
    return [(image, captions.get(image, "")) for image in images]


def _writer_for(folder: Path, image: Path, caption_extension: str, writers: dict) -> CaptionWriter:
    """The writer that updates the place an image's caption already comes from (sidecar by default)."""
    def writer(output: str, ext: str = caption_extension) -> CaptionWriter:
        if (output, ext) not in writers:
            writers[output, ext] = CaptionWriter(folder, output, ext)
        return writers[output, ext]

    for ext in (caption_extension, ".caption", ".txt"):
        if image.with_suffix(ext).is_file():
            return writer("txt", ext)
    name = image.relative_to(folder).as_posix()
    for output, file_name in METADATA_FILES.items():
        if (folder / file_name).is_file() and name in writer(output).rows:
            return writer(output)
    return writer("txt")


def edit_caption(folder: str | Path, image: str | Path, text: str, caption_extension: str = ".txt") -> None:
    """Set one image's caption where it is stored now (a new sidecar file if it had none)."""
    folder = Path(folder).expanduser().absolute()
    image = Path(image) if Path(image).is_absolute() else folder / image
    if not image.is_file():
        raise DatasetError(f"No image {image}; give its path or its name inside {folder}.")
    _writer_for(folder, image, caption_extension, {}).write({image: text.strip()})


def replace_in_captions(folder: str | Path, find: str, replace: str, *, regex: bool = False,
                        caption_extension: str = ".txt") -> int:
    """Find/replace across every caption of the folder; returns how many captions changed."""
    pattern = re.compile(find if regex else re.escape(find))
    folder = Path(folder).expanduser().absolute()
    writers: dict = {}
    updates: dict[int, tuple[CaptionWriter, dict[Path, str]]] = {}
    for image, caption in list_captions(folder, caption_extension):
        new = pattern.sub(replace, caption).strip()
        if caption and new != caption:
            writer = _writer_for(folder, image, caption_extension, writers)
            updates.setdefault(id(writer), (writer, {}))[1][image] = new
    for writer, captions in updates.values():
        writer.write(captions)  # one rewrite per metadata file, not one per caption
    return sum(len(captions) for _, captions in updates.values())


def tag_table(folder: str | Path, caption_extension: str = ".txt") -> list[tuple[str, int]]:
    """How many captions use each comma-separated tag, most used first."""
    counts = Counter(tag for _, caption in list_captions(folder, caption_extension) for tag in set(split_tags(caption)))
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))
