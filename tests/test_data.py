"""Tests for lora_trainer.data: finding, validating and captioning images, buckets and caption handling."""

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_trainer.data import (
    DatasetScan,
    ImageItem,
    load_image,
    make_buckets,
    nearest_bucket,
    process_caption,
    resize_and_crop,
    scan_dataset,
    tag_frequency,
)
from lora_trainer.data import images as images_module
from lora_trainer.errors import DatasetError


def write_image(path: Path, size: tuple[int, int] = (80, 64), mode: str = "RGB", **save_args: object) -> Path:
    """Save a small gradient image so decoders have real content to work on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    gradient = np.add.outer(np.arange(height), np.arange(width)).astype(np.uint8)
    Image.fromarray(np.stack([gradient] * 3, axis=-1)).convert(mode).save(path, **save_args)
    return path


def write_caption(path: Path, text: str) -> None:
    """Write a caption file."""
    path.write_text(text, encoding="utf-8")


def captions_by_name(scan: DatasetScan) -> dict[str, str]:
    """Captions keyed by image file name."""
    return {item.path.name: item.caption for item in scan.items}


def test_flat_folder_reads_sidecar_captions(tmp_path: Path) -> None:
    write_image(tmp_path / "b.png")
    write_image(tmp_path / "a.jpg")
    write_caption(tmp_path / "a.txt", "  a cat, sitting \n")
    write_caption(tmp_path / "b.caption", "a dog")
    (tmp_path / "notes.md").write_text("not an image")

    scan = scan_dataset(tmp_path)

    assert [item.path.name for item in scan.items] == ["a.jpg", "b.png"]
    assert captions_by_name(scan) == {"a.jpg": "a cat, sitting", "b.png": "a dog"}
    assert scan.items[0] == ImageItem(tmp_path / "a.jpg", "a cat, sitting", 1, 80, 64)
    assert scan.skipped == [] and scan.uncaptioned == [] and scan.converted == []


def test_custom_caption_extension_comes_before_txt(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    write_caption(tmp_path / "a.tags", "from tags")
    write_caption(tmp_path / "a.txt", "from txt")

    assert captions_by_name(scan_dataset(tmp_path, caption_extension=".tags")) == {"a.png": "from tags"}


def test_kohya_repeat_folders_set_repeats(tmp_path: Path) -> None:
    write_image(tmp_path / "3_ink" / "a.png")
    write_image(tmp_path / "3_ink" / "nested" / "b.png")
    write_image(tmp_path / "plain" / "c.png")
    write_image(tmp_path / "d.png")

    scan = scan_dataset(tmp_path, default_repeats=2)

    repeats = {item.path.name: item.repeats for item in scan.items}
    assert repeats == {"a.png": 3, "b.png": 3, "c.png": 2, "d.png": 2}
    assert [item.path for item in scan.items] == sorted(item.path for item in scan.items)


def test_metadata_csv_with_bom_and_jsonl_give_captions(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    (tmp_path / "metadata.csv").write_text('file_name,text\na.png,"red, round"\n', encoding="utf-8-sig")
    write_image(tmp_path / "5_sub" / "c.png")
    (tmp_path / "5_sub" / "metadata.jsonl").write_text(json.dumps({"file_name": "c.png", "text": " blue "}) + "\n")

    scan = scan_dataset(tmp_path)

    assert captions_by_name(scan) == {"a.png": "red, round", "b.png": "", "c.png": "blue"}
    assert scan.uncaptioned == [tmp_path / "b.png"]


def test_metadata_paths_are_relative_to_their_folder(tmp_path: Path) -> None:
    write_image(tmp_path / "10_ink" / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "10_ink/a.png", "text": "ink drawing"}))

    (item,) = scan_dataset(tmp_path).items

    assert (item.caption, item.repeats) == ("ink drawing", 10)


def test_sidecar_caption_beats_metadata(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    write_caption(tmp_path / "a.txt", "from sidecar")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "from metadata"}))

    assert captions_by_name(scan_dataset(tmp_path)) == {"a.png": "from sidecar"}


def test_caption_file_and_different_metadata_caption_warn_and_the_file_wins(tmp_path: Path, caplog) -> None:
    for name in ("a", "b", "c"):
        write_image(tmp_path / f"{name}.png")
    write_caption(tmp_path / "a.txt", "old caption")
    write_caption(tmp_path / "b.txt", "same caption")
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,new caption\nb.png,same caption\nc.png,only here\n")

    with caplog.at_level(logging.WARNING, logger="lora_trainer.data.images"):
        scan = scan_dataset(tmp_path)

    assert captions_by_name(scan) == {"a.png": "old caption", "b.png": "same caption", "c.png": "only here"}
    warnings = [r.getMessage() for r in caplog.records if "metadata.csv/jsonl caption" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("1 images have a caption file and a different") and "(a.png)" in warnings[0]


def test_legacy_encoded_captions_are_read_and_named_in_a_warning(tmp_path: Path, caplog) -> None:
    for name in ("good0", "good1", "bom", "notepad"):
        write_image(tmp_path / f"{name}.png")
    write_caption(tmp_path / "good0.txt", "plain")
    (tmp_path / "good1.txt").write_bytes("caf\xe9, cr\xe8me".encode("latin-1"))  # an older Windows editor
    (tmp_path / "bom.txt").write_bytes("\ufeffüber".encode())
    (tmp_path / "notepad.txt").write_text("naïve", encoding="utf-16")  # Notepad's "Unicode"

    with caplog.at_level(logging.WARNING, logger="lora_trainer.data.images"):
        scan = scan_dataset(tmp_path)

    assert captions_by_name(scan) == {"good0.png": "plain", "good1.png": "café, crème", "bom.png": "über",
                                      "notepad.png": "naïve"}
    assert scan.skipped == []
    legacy = [r.getMessage() for r in caplog.records if "not UTF-8" in r.getMessage()]
    assert len(legacy) == 1 and str(tmp_path / "good1.txt") in legacy[0] and "café" in legacy[0]


def test_a_caption_file_that_is_not_text_skips_only_its_image(tmp_path: Path) -> None:
    write_image(tmp_path / "good.png")
    write_caption(tmp_path / "good.txt", "a cat")
    write_image(tmp_path / "binary.png")
    (tmp_path / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")

    scan = scan_dataset(tmp_path)

    assert captions_by_name(scan) == {"good.png": "a cat"}
    (path, reason), = scan.skipped
    assert path == tmp_path / "binary.png"
    assert reason == "its caption file binary.txt is not text (binary data or an unknown encoding); save it as UTF-8 " \
                     "text or remove it"
    assert "skipped " + str(tmp_path / "binary.png") in scan.summary()


def test_metadata_without_text_column_is_refused(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text("file_name,label\na.png,1\n")

    with pytest.raises(DatasetError, match="metadata.csv needs a header row with file_name and text"):
        scan_dataset(tmp_path)


def test_missing_caption_empty_and_trigger_modes(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    write_caption(tmp_path / "a.txt", "   ")

    assert captions_by_name(scan_dataset(tmp_path, missing_caption="empty")) == {"a.png": ""}
    assert captions_by_name(scan_dataset(tmp_path, missing_caption="trigger")) == {"a.png": ""}
    scan = scan_dataset(tmp_path, missing_caption="trigger", trigger_word="ohwx")
    assert captions_by_name(scan) == {"a.png": "ohwx"}
    assert scan.uncaptioned == [tmp_path / "a.png"]


def test_missing_caption_error_lists_the_files(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    write_caption(tmp_path / "a.txt", "fine")
    write_image(tmp_path / "lonely.png")

    with pytest.raises(DatasetError, match=r"1 images .* have no caption: .*lonely\.png") as error:
        scan_dataset(tmp_path, missing_caption="error")
    assert "a.png" not in str(error.value)


def test_trigger_word_is_prepended_once(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    write_caption(tmp_path / "a.txt", "a cat, sitting")
    write_image(tmp_path / "b.png")
    write_caption(tmp_path / "b.txt", "a dog, ohwx, running")

    scan = scan_dataset(tmp_path, trigger_word="ohwx")

    assert captions_by_name(scan) == {"a.png": "ohwx, a cat, sitting", "b.png": "a dog, ohwx, running"}


def test_bad_files_are_skipped_with_reasons_and_good_ones_survive(tmp_path: Path, caplog) -> None:
    write_image(tmp_path / "good.png")
    (tmp_path / "corrupt.png").write_bytes(np.random.default_rng(0).bytes(2000))
    (tmp_path / "empty.png").write_bytes(b"")
    jpeg = write_image(tmp_path / "full.jpg", size=(256, 256)).read_bytes()
    (tmp_path / "full.jpg").unlink()
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    write_image(tmp_path / "tiny.png", size=(32, 48))

    with caplog.at_level(logging.WARNING, logger="lora_trainer.data.images"):
        scan = scan_dataset(tmp_path)

    assert [item.path.name for item in scan.items] == ["good.png"]
    reasons = {path.name: reason for path, reason in scan.skipped}
    assert reasons.keys() == {"corrupt.png", "empty.png", "truncated.jpg", "tiny.png"}
    assert "not an image" in reasons["corrupt.png"]
    assert "0 bytes" in reasons["empty.png"]
    assert "truncated" in reasons["truncated.jpg"]
    assert "too small: 32x48" in reasons["tiny.png"]
    assert "tiny.png" in scan.summary() and "4 skipped" in scan.summary()
    assert "truncated.jpg" in caplog.text


def test_image_over_pixel_limit_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "big.png", size=(200, 200))
    monkeypatch.setattr(images_module, "MAX_IMAGE_PIXELS", 10_000)

    scan = scan_dataset(tmp_path)

    assert [item.path.name for item in scan.items] == ["a.png"]
    assert scan.skipped == [(tmp_path / "big.png", "too large: 200x200 is over the 0.01 megapixel limit")]


def test_folder_of_only_bad_images_raises_with_reasons(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    write_image(tmp_path / "tiny.png", size=(16, 16))

    with pytest.raises(DatasetError, match="None of the 2 images") as error:
        scan_dataset(tmp_path)
    assert "empty.png: empty file (0 bytes)" in str(error.value)
    assert "tiny.png: too small" in str(error.value)


def test_missing_folder_error_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=f"{missing}.*does not exist"):
        scan_dataset(missing)


def test_file_instead_of_folder_is_refused(tmp_path: Path) -> None:
    image = write_image(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="is a file, not a folder"):
        scan_dataset(image)


def test_folder_without_images_says_what_it_looked_for(tmp_path: Path) -> None:
    write_caption(tmp_path / "a.txt", "caption without image")
    with pytest.raises(DatasetError, match=r"No images found.*\.png.*10_name"):
        scan_dataset(tmp_path)


def test_cmyk_palette_alpha_and_16_bit_load_as_rgb(tmp_path: Path) -> None:
    write_image(tmp_path / "cmyk.jpg", mode="CMYK")
    palette = Image.new("P", (80, 64), 0)
    palette.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    palette.paste(1, (0, 0, 40, 64))
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette.png")
    rgba = Image.new("RGBA", (80, 64), (0, 0, 0, 0))
    rgba.paste((0, 128, 0, 255), (0, 0, 40, 64))
    rgba.save(tmp_path / "rgba.png")
    deep = np.full((64, 80), 65535, dtype=np.uint16)
    deep[:, 40:] = 32768
    Image.fromarray(deep).save(tmp_path / "deep.png")

    scan = scan_dataset(tmp_path)

    converted = {path.name: note for path, note in scan.converted}
    assert converted == {
        "cmyk.jpg": "CMYK converted to RGB",
        "palette.png": "palette with transparency composited on white",
        "rgba.png": "alpha composited on white",
        "deep.png": "16-bit scaled to 8-bit",
    }
    loaded = {name: load_image(tmp_path / name) for name in converted}
    assert all(image.mode == "RGB" and image.size == (80, 64) for image in loaded.values())
    assert loaded["palette.png"].getpixel((10, 10)) == (0, 0, 255)
    assert loaded["palette.png"].getpixel((60, 10)) == (255, 255, 255)
    assert loaded["rgba.png"].getpixel((10, 10)) == (0, 128, 0)
    assert loaded["rgba.png"].getpixel((60, 10)) == (255, 255, 255)
    assert loaded["deep.png"].getpixel((10, 10)) == (255, 255, 255)
    assert loaded["deep.png"].getpixel((60, 10)) == (128, 128, 128)


def test_exif_orientation_swaps_width_and_height(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    write_image(tmp_path / "rotated.jpg", size=(80, 64), exif=exif)

    (item,) = scan_dataset(tmp_path).items

    assert (item.width, item.height) == (64, 80)
    assert load_image(tmp_path / "rotated.jpg").size == (64, 80)


def test_load_image_names_the_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not really a png")
    with pytest.raises(DatasetError, match=f"{bad}.*not an image"):
        load_image(bad)


@pytest.mark.parametrize(
    ("resolution", "step", "min_size", "max_size"),
    [(512, 64, 256, 1024), (1024, 64, 256, 2048), (64, 8, 32, 128), (64, 64, 256, 1024)],
)
def test_buckets_are_step_multiples_within_area(resolution: int, step: int, min_size: int, max_size: int) -> None:
    buckets = make_buckets(resolution, min_size=min_size, max_size=max_size, step=step)

    assert (resolution, resolution) in buckets
    assert buckets == sorted(set(buckets), key=lambda size: (size[0] / size[1], size[0]))
    for width, height in buckets:
        assert width % step == 0 and height % step == 0
        assert width * height <= resolution**2
        assert min(min_size, resolution) <= min(width, height) and max(width, height) <= max(max_size, resolution)


def test_buckets_cover_tall_to_wide_and_wide_image_gets_wide_bucket() -> None:
    buckets = make_buckets(64, min_size=32, max_size=128, step=8)
    assert buckets[0] == (32, 128) and buckets[-1] == (128, 32)

    width, height = nearest_bucket(200, 100, buckets)

    assert width > height
    assert math.isclose(width / height, 2, rel_tol=0.15)
    assert nearest_bucket(100, 100, buckets) == (64, 64)


def test_resize_and_crop_returns_exact_bucket_size_and_offset() -> None:
    image = Image.new("RGB", (300, 100), (10, 20, 30))

    resized, (top, left) = resize_and_crop(image, (96, 64))

    assert resized.size == (96, 64)
    assert (top, left) == (0, (192 - 96) // 2)
    assert resized.getpixel((48, 32)) == (10, 20, 30)
    huge = Image.new("RGB", (4000, 3000))
    assert resize_and_crop(huge, (64, 64))[0].size == (64, 64)


def caption_with_seed(seed: int, **options: object) -> str:
    """Process a fixed caption with a fresh generator."""
    settings = {"shuffle": True, "keep_tokens": 1, "dropout": 0.0} | options
    return process_caption("ohwx, a, b, c, d, e, f", generator=torch.Generator().manual_seed(seed), **settings)


def test_process_caption_is_reproducible_and_keeps_tokens() -> None:
    results = {caption_with_seed(seed) for seed in range(20)}

    assert caption_with_seed(3) == caption_with_seed(3)
    assert len(results) > 1
    for result in results:
        tags = result.split(", ")
        assert tags[0] == "ohwx" and sorted(tags[1:]) == ["a", "b", "c", "d", "e", "f"]
    assert caption_with_seed(3, shuffle=False) == "ohwx, a, b, c, d, e, f"
    assert process_caption(" x ,, y ,", shuffle=False, keep_tokens=0, dropout=0.0, generator=torch.Generator()) == (
        "x, y"
    )


def test_caption_dropout_empties_caption_and_uses_the_rng_the_same_either_way() -> None:
    kept, dropped = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    common = {"shuffle": True, "keep_tokens": 0}

    assert sorted(process_caption("a, b, c", dropout=0.0, generator=kept, **common).split(", ")) == ["a", "b", "c"]
    assert process_caption("a, b, c", dropout=1.0, generator=dropped, **common) == ""
    assert torch.equal(kept.get_state(), dropped.get_state())


def test_tag_frequency_counts_tags_per_folder() -> None:
    items = [
        ImageItem(Path("/d/10_ink/a.png"), "ohwx, cat, black", 10, 64, 64),
        ImageItem(Path("/d/10_ink/b.png"), "ohwx, cat", 10, 64, 64),
        ImageItem(Path("/d/plain/c.png"), "dog", 1, 64, 64),
    ]

    assert tag_frequency(items) == {"10_ink": {"ohwx": 2, "cat": 2, "black": 1}, "plain": {"dog": 1}}


def test_scan_summary_lists_first_ten_skipped() -> None:
    scan = DatasetScan(skipped=[(Path(f"/d/{index}.png"), "empty file (0 bytes)") for index in range(12)])

    summary = scan.summary()

    assert "/d/9.png: empty file (0 bytes)" in summary
    assert "/d/10.png" not in summary
    assert "2 more skipped" in summary
