"""The files a diffusion transformer is made of, found and read offline.

People hold these models as ComfyUI lays them out (a transformer-only file in `models/diffusion_models`, text
encoders in `models/text_encoders`, the autoencoder in `models/vae`), as all-in-one checkpoints, or as diffusers
folders. A family names the parts it needs (`Part`: what the part is, how its keys look, what its file is
usually called); `find_parts` gathers them from the config's paths, the base file itself and the folders beside
it, and says exactly which file is missing before anything is loaded. Weights stored as fp8 (plain, or ComfyUI's
"scaled fp8" with per-tensor scales) are read back in bf16 here, their scales noted for `hold_linears`;
GGUF files' blocks too.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lora_trainer.backbones.checkpoint import PICKLE_SUFFIXES
from lora_trainer.errors import CheckpointError
from lora_trainer.memory import nf4 as nf4_layers
from lora_trainer.memory.gguf_files import gguf_reader, read_gguf

log = logging.getLogger(__name__)

FP8 = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))
# where ComfyUI and Forge keep the parts of a split model, relative to the models folder
PART_FOLDERS = {"text_encoder": ("text_encoders", "clip", "text_encoder"), "vae": ("vae", "VAE")}


@dataclass(frozen=True)
class Part:
    """One file-level part a family needs besides its transformer."""

    role: str  # "text_encoder" or "vae": the config key that names it and the folder it is looked for in
    name: str  # what the user calls it: "T5-XXL", "CLIP-L", "the Flux autoencoder"
    file_hint: str  # the usual file name(s), for messages and the search beside the model: "t5xxl*"
    prefixes: tuple[str, ...]  # where its keys start inside an all-in-one checkpoint ("text_encoders.t5xxl.transformer.")
    matches: Callable[[set[str]], bool]  # whether a file's keys (prefix removed) are this part


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names of a .safetensors file, read from its header; a clear error for anything else."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"Model file not found: {path.resolve()}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path.name} is a pickle file, which can run code when loaded; diffusion transformers "
                              "load from .safetensors only. Get the .safetensors version of it.")
    if path.suffix.lower() == ".gguf":
        try:
            return [tensor.name for tensor in gguf_reader(path).tensors]
        except ImportError as exc:
            raise CheckpointError(str(exc)) from None
        except (ValueError, OSError) as exc:
            raise CheckpointError(f"Cannot read {path} ({path.stat().st_size / 2**20:.1f} MiB): {exc}. The file is "
                                  "probably truncated or not a model; download it again.") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"Cannot read {path} ({path.stat().st_size / 2**20:.1f} MiB): {exc}. The file is "
                              "probably truncated or not a model; download it again.") from None


def read_weights(path: Path, prefix: str = "", dtype: torch.dtype | None = None,
                 stored: dict | None = None) -> dict[str, torch.Tensor]:
    """The tensors of `path` under `prefix` (removed from their names), fp8 ones dequantized to `dtype` (bf16 by
    default) with their per-tensor scales, as ComfyUI does it, and a GGUF file's block formats likewise; other
    tensors keep their stored dtype, or take `dtype` when given. `stored` collects how each dequantized weight was
    stored (its fp8 scale, its GGUF blocks) by its storage's address, so that `hold_linears` can hold it so."""
    if Path(path).suffix.lower() == ".gguf":
        try:
            return read_gguf(path, prefix, dtype, stored)
        except (ValueError, OSError, ImportError) as exc:
            raise CheckpointError(f"Cannot read {path}: {exc}") from None
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            names = [k for k in f.keys() if k.startswith(prefix)]  # noqa: SIM118 - safe_open is not iterable
            scales = {k for k in names if k.endswith((".scale_weight", ".weight_scale"))}
            nf4 = {k.removesuffix(nf4_layers.STATE) for k in names if k.endswith(nf4_layers.STATE)}
            nf4_parts = {k for k in names if k.rpartition(".weight.")[0] + ".weight" in nf4 and k not in nf4}
            for key in names:
                if key in scales or key in nf4_parts or \
                        key.endswith((".scale_input", ".input_scale", ".comfy_quant")) or key[len(prefix):] == "scaled_fp8":
                    continue
                tensor = f.get_tensor(key)
                if key in nf4:  # bitsandbytes' packed 4 bits and the state beside them (Forge's NF4 files)
                    parts = {k[len(key) + 1:]: f.get_tensor(k) for k in nf4_parts if k.startswith(f"{key}.")}
                    tensor = nf4_layers.from_nf4(tensor, parts, dtype or torch.bfloat16)
                    if stored is not None:
                        stored[tensor.untyped_storage().data_ptr()] = nf4_layers.STORED
                elif tensor.dtype in FP8:
                    base = key.removesuffix(".weight")
                    scale = next((f.get_tensor(s) for s in (f"{base}.scale_weight", f"{base}.weight_scale")
                                  if s in scales), None)
                    scale = torch.ones(()) if scale is None else scale.float()
                    dtype_out = dtype or torch.bfloat16  # scale rounded first, as ComfyUI and Fp8Linear do it
                    tensor = tensor.to(dtype_out) * scale.to(dtype_out)
                    if stored is not None:
                        stored[tensor.untyped_storage().data_ptr()] = scale
                elif dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                out[key[len(prefix):]] = tensor
    except ImportError as exc:
        raise CheckpointError(f"{Path(path).name}: {exc}") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"Cannot read {path}: {exc}. The file is probably truncated; download it again.") from None
    return out


def shape_of(path: Path, key: str) -> tuple[int, ...] | None:
    """A tensor's shape read from a file's header (None when the file has no such tensor)."""
    if Path(path).suffix.lower() == ".gguf":
        found = [t for t in gguf_reader(path).tensors if t.name == key]
        return tuple(int(n) for n in reversed(found[0].shape)) if found else None
    with safe_open(str(path), framework="pt") as f:
        return tuple(f.get_slice(key).get_shape()) if key in set(f.keys()) else None


@dataclass
class Found:
    """Where a part's weights are: a file, and the prefix of its keys in that file."""

    path: Path
    prefix: str = ""


def _which_part(keys: list[str], parts: list[Part]) -> tuple[Part, str] | None:
    """The part (and key prefix) a file's keys make up, if any."""
    for part in parts:
        for prefix in ("", *part.prefixes):
            inner = {k[len(prefix):] for k in keys if k.startswith(prefix)}
            if inner and part.matches(inner):
                return part, prefix
    return None


def find_parts(base: Path, base_keys: list[str], parts: list[Part], family_name: str, *,
               given: list[str] = (), vae: str = "") -> dict[str, Found]:
    """Each part's file: named in the config (`given` text encoders, `vae`), inside the base file, or found in the
    folders a ComfyUI / Forge installation keeps them in beside the base model. A named file that is none of the
    parts, or a missing part, stops here with the file names to add."""
    found: dict[str, Found] = {}
    for named in [*given, *([vae] if vae else [])]:
        path = Path(named).expanduser()
        which = _which_part(safetensors_keys(path), parts)
        if which is None:
            wanted = ", ".join(f"{p.name} ({p.file_hint})" for p in parts)
            raise CheckpointError(f"{path.name} is none of the parts a {family_name} model uses ({wanted}). Is it the "
                                  f"text encoder or autoencoder of another model family?")
        found.setdefault(which[0].name, Found(path, which[1]))
    for part in parts:  # an all-in-one checkpoint holds them itself
        if part.name not in found:
            which = _which_part(base_keys, [part])
            if which is not None:
                found[part.name] = Found(base, which[1])
    missing = [p for p in parts if p.name not in found]
    for part in missing:
        for candidate in _beside(base, part):
            try:
                which = _which_part(safetensors_keys(candidate), [part])
            except CheckpointError:
                continue
            if which is not None:
                found[part.name] = Found(candidate, which[1])
                log.info("%s: using %s (set %s in the config to choose another file).", part.name, candidate,
                         "vae" if part.role == "vae" else "text_encoders")
                break
    missing = [p for p in parts if p.name not in found]
    if missing:
        needs = "; ".join(f"{p.name} (usually {p.file_hint}, in models/{PART_FOLDERS[p.role][0]})" for p in missing)
        raise CheckpointError(
            f"{base.name} is a {family_name} transformer without everything it needs to train: add {needs}. Put the "
            f"files where ComfyUI keeps them beside {base.parent}, or name them in the config: text_encoders: "
            "[file, ...] and vae: file.")
    return found


def _beside(base: Path, part: Part) -> list[Path]:
    """Files that may be `part`, in the folders beside the base model where hosts keep such parts; full-precision
    files before fp8 ones."""
    roots = [base.parent, base.parent.parent]
    folders = [base.parent] + [root / name for root in roots for name in PART_FOLDERS[part.role]]
    seen, out = set(), []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*.safetensors")):
            if path != base and path not in seen and any(fnmatch.fnmatch(path.name.lower(), hint)
                                                         for hint in part.file_hint.split(" or ")):
                seen.add(path)
                out.append(path)
    return sorted(out, key=lambda p: "fp8" in p.name.lower())


def find_tokenizer(needed: str, places: list[Path], relative: list[str], marker: str) -> Path:
    """The first folder holding the `needed` tokenizer (a file named `marker` in it): each of `places` itself, or
    one of the `relative` paths under it (a diffusers folder's tokenizer_2, ComfyUI's comfy/text_encoders/...)."""
    for place in places:
        for sub in ("", *relative):
            folder = place / sub if sub else place
            if (folder / marker).is_file():
                return folder
    looked = ", ".join(str(p) for p in places) or "nowhere (no folder was given)"
    raise CheckpointError(
        f"The {needed} tokenizer was not found (looked in {looked}). It ships with ComfyUI and Forge and with every "
        f"diffusers copy of the model: set tokenizers: to your ComfyUI or Forge folder, to a diffusers folder of this "
        f"model, or to a folder holding its {marker}.")


def host_roots(path: Path) -> list[Path]:
    """The ComfyUI / Forge installations a model file lies in (its folders that hold `comfy/` or `backend/`)."""
    return [p for p in Path(path).resolve().parents if (p / "comfy").is_dir() or (p / "backend" / "huggingface").is_dir()]


def stored_dtype(folder: Path) -> torch.dtype:
    """The dtype of the weights in a diffusers component folder (read from its first tensor)."""
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{folder} holds no .safetensors weights: the diffusers folder is incomplete.")
    with safe_open(str(shards[0]), framework="pt") as f:
        return f.get_tensor(next(iter(f.keys()))).dtype


def block_count(keys, block: str) -> int:
    """How many numbered blocks (`block.N.`) the keys hold (`block` may be dotted: `encoder.down.0.block`)."""
    ids = {int(k.split(".")[block.count(".") + 1]) for k in keys if k.startswith(f"{block}.")}
    return max(ids) + 1 if ids else 0
