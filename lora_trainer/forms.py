"""The config as a form: one neutral widget spec per field, which every front door renders.

The WebUI tab and the standalone app (`ui/blocks.py`), the ComfyUI nodes (`hosts/comfyui.py`) and the WebUI's
settings page (`hosts/a1111.py`) draw their widgets from these specs, so a label, default, bound or choice is
decided here, from the config's fields, once. So is the rule they share: a key left to the model family
(None in the config) shows as "preset" in a choice and as 0 in a number.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lora_trainer.config import TrainConfig, config_fields, field_kind, is_optional

PRESET = "preset"  # a choice widget's word for "the model family's value"
UNSET = 0  # a number widget's value for it


@dataclass(frozen=True)
class FieldSpec:
    """How a form shows one config field; every renderer turns it into its own widget."""

    name: str
    label: str  # unique within the WebUI tab: the WebUI keys saved defaults by label
    kind: str  # "choice", "bool", "int", "float", "text" or "lines" (a list, one item per line)
    default: Any  # as the widget shows it: "preset" or 0 where the config leaves the key to the model family
    help: str
    group: str
    choices: tuple = ()  # for "choice": "preset" first where the family may choose
    min: float | None = None  # 0 for a number the family may choose (0 = its preset)
    max: float | None = None
    preset: bool = False  # the model family's preset sets this key (PRESETS)
    unset: Any = None  # what the widget shows for None ("preset" or 0); None where the key needs a value

    def show(self, value: Any) -> Any:
        """A config value as this widget shows it."""
        if value is None:
            return self.unset
        if self.kind == "lines" and isinstance(value, list):
            return "\n".join(value)
        return value


def _spec(f: dataclasses.Field) -> FieldSpec:
    meta = f.metadata
    kind = "choice" if meta["choices"] else {"str": "text", "list": "lines"}.get(field_kind(f), field_kind(f))
    help_text, low, choices, unset = meta["help"], meta["min"], tuple(meta["choices"] or ()), None
    if is_optional(f):  # None in the config: the model family's preset, or the key's own default
        if kind == "choice":
            unset, choices = PRESET, (PRESET, *choices)
            help_text += " 'preset' = the model family's choice."
        else:
            unset = low = UNSET
            help_text += " 0 = the model family's preset." if meta["preset"] else " 0 = the default."
    if kind == "lines":
        help_text += " One per line."
    spec = FieldSpec(name=f.name, label=meta["label"] or f.name.replace("_", " ").capitalize(), kind=kind,
                     default=None, help=help_text, group=meta["group"], choices=choices, min=low, max=meta["max"],
                     preset=meta["preset"], unset=unset)
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return dataclasses.replace(spec, default=spec.show(default))


def form_specs(cls: type = TrainConfig) -> dict[str, FieldSpec]:
    """Every field of a config as a widget spec, by name, in declaration order."""
    return {f.name: _spec(f) for f in config_fields(cls)}


def config_values(widgets: Mapping[str, Any], cls: type = TrainConfig) -> dict[str, Any]:
    """Widget values as config values: a key showing its unset value ("preset", 0, empty) is left out."""
    specs = form_specs(cls)
    values: dict[str, Any] = {}
    for name, value in widgets.items():
        spec = specs[name]
        if spec.unset is not None and (value is None or value == "" or value == spec.unset):
            continue  # the config's None: the model family's preset (or the key's own default)
        if isinstance(value, str) and spec.kind not in ("text", "lines"):
            value = value.strip()
        if isinstance(value, float) and spec.kind == "int" and value.is_integer():
            value = int(value)  # Gradio's number box gives floats
        values[name] = value
    return values
