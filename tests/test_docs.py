"""The README stays true to the code it documents."""

from pathlib import Path

from lora_trainer.config import CaptionConfig, config_fields, markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_config_table_is_the_generated_one():
    text = README.read_text(encoding="utf-8")
    table = text.split("<!-- config-table:start -->\n", 1)[1].split("<!-- config-table:end -->", 1)[0]
    assert table.strip() == markdown_table().strip(), "regenerate the table with `train --help-config`"
    assert all(f"`{f.name}`" in table for f in config_fields())


def test_readme_caption_table_is_the_generated_one():
    text = README.read_text(encoding="utf-8")
    table = text.split("<!-- caption-table:start -->\n", 1)[1].split("<!-- caption-table:end -->", 1)[0]
    assert table.strip() == markdown_table(CaptionConfig).strip()


def test_readme_commands_are_the_ci_commands():
    text = README.read_text(encoding="utf-8")
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert "python -m pytest -q" in text and "python -m pytest -q" in ci
    assert "python -m lora_trainer demo" in text
    assert "--no-deps open-clip-torch" in text and "--no-deps open-clip-torch" in ci
