"""Writing converted weights: a release -> `backbone.npz` + phase-2 `export.npz`; a timm /
Hugging Face ViT -> a big_vision `.npz`. Everything is read and checked before the first
byte is written, and each file appears whole (written beside, then renamed)."""

from __future__ import annotations

import contextlib
import gzip
import os
import uuid
from typing import Optional

import numpy as np

from lpt_jax.backbones import check_finite
from lpt_jax.backbones.vit import vit_from_config
from lpt_jax.backbones.vit_timm import heads_for_width
from lpt_jax.backbones.vit_weights import read_arrays
from lpt_jax.convert.fit import abstract_params, check_fits, vit_shapes
from lpt_jax.convert.release import PLACES_RELEASE, Release, read_release
from lpt_jax.errors import CheckpointError
from lpt_jax.run import exports
from lpt_jax.storage import files
from lpt_jax.tree import flatten, unflatten
from lpt_jax.weights.npz import file_fingerprint

SHIPPED_CLASS_NAMES = {  # --class_names=<dataset>: the lists the data sources use
    name: os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                       "splits", name, "classnames.txt")
    for name in ("places_lt", "imagenet_lt")}
RELEASE_FORMAT = "LPT PyTorch release (DongSky/LPT), torch.save {'state_dict': ...}"


# ------------------------------------------------------------------------------------------
# Class names.

def read_class_names(spec: str, num_classes: int) -> Optional[list[str]]:
    """'places_lt' / 'imagenet_lt' (the shipped lists), a file (one name per line, or
    '<id> <name>' lines: the name is kept, as the data sources do), or 'none'."""
    if spec == "none":
        return None
    path = SHIPPED_CLASS_NAMES.get(spec, spec)
    if not files.exists(path):
        raise CheckpointError(f"--class_names={spec}: no such file; use one of "
                              f"{', '.join(SHIPPED_CLASS_NAMES)}, none, or a file of names")
    raw = files.read_bytes(path)
    try:
        text = (gzip.decompress(raw) if path.endswith(".gz") else raw).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"--class_names={spec}: {path} is not a text file ({e})") from None
    names = [line.split(maxsplit=1)[-1] for line in text.splitlines() if line.strip()]
    if len(names) != num_classes:
        raise CheckpointError(f"--class_names={spec}: {len(names)} names, but the checkpoint's "
                              f"head has {num_classes} classes")
    return names


# ------------------------------------------------------------------------------------------
# Release.

def eval_settings(release: Release) -> dict:
    """The config fields (dotted) and values that make configs/places_lt.py (whose defaults
    are the published release's) build this release's model; {} for LPT_places.pth itself."""
    shapes, settings = release.shapes(), {}
    for key in ("width", "depth", "num_heads", "mlp_dim", "patch_size", "image_size"):
        if shapes[key] != PLACES_RELEASE[key]:
            settings[f"model.vit.{key}"] = shapes[key]
    for key in ("prompt_length", "pool_size", "shared_depth", "top_k"):
        if shapes[key] != PLACES_RELEASE[key]:
            settings[f"model.lpt.{key}"] = shapes[key]
    if shapes["image_size"] != PLACES_RELEASE["image_size"]:
        size = shapes["image_size"]
        settings["data.image_size"] = size
        settings["data.resize_size"] = size * 8 // 7  # the release's eval resize
    return settings


def export_meta(release: Release, backbone_path: str, backbone_identity: dict, class_names,
                source: dict) -> dict:
    size = release.vit["image_size"]
    meta = {"phase": 2, "step": None, "num_classes": release.num_classes,
            "config": {"model": release.model_config().to_dict(),
                       "data": {"image_size": size, "resize_size": size * 8 // 7},
                       "backbone": {"checkpoint": backbone_path}},
            "backbone": backbone_identity,
            "converted_from": source, "eval_settings": eval_settings(release)}
    if class_names is not None:
        meta["class_names"] = list(class_names)
    return meta


def convert_release(path: str, out_dir: str, *, num_heads: Optional[int] = None,
                    top_k: int = 2, class_names: str = "places_lt",
                    overwrite: bool = False) -> dict:
    """Writes `out_dir/backbone.npz` and `out_dir/export.npz`; returns what was written."""
    release = read_release(path, num_heads, top_k)
    check_finite({**release.backbone, **release.prompts}, path)  # before anything is written
    names = read_class_names(class_names, release.num_classes)
    backbone_path, export_path = _outputs(out_dir, ("backbone.npz", "export.npz"), overwrite)
    source = {"path": files.absolute(path), "format": RELEASE_FORMAT,
              **{k: v for k, v in file_fingerprint(path).items() if k != "path"}}
    # The pair appears together or not at all: both written under temporary names first.
    with _temporaries(backbone_path, export_path) as (tmp_backbone, tmp_export):
        _write_npz(tmp_backbone, release.backbone)
        identity = {**file_fingerprint(tmp_backbone), "path": backbone_path}
        trained = unflatten(release.prompts)
        release.backbone = {}  # the storages can go before the export is written
        exports.write(tmp_export, trained,
                      export_meta(release, backbone_path, identity, names, source))
    return {"backbone": backbone_path, "export": export_path, "shapes": release.shapes(),
            "class_names": class_names if names is not None else None,
            "eval_settings": eval_settings(release)}


# ------------------------------------------------------------------------------------------
# timm / Hugging Face backbone.

def convert_backbone(path: str, out: str, *, num_heads: Optional[int] = None,
                     overwrite: bool = False) -> dict:
    """A timm ViT state dict (.safetensors/.pth/.bin) -> a big_vision .npz at `out`."""
    arrays = read_arrays(path, num_heads=num_heads)
    shapes = vit_shapes(arrays, path)
    shapes["num_heads"] = heads_for_width(shapes["width"], num_heads, path)
    check_fits(path, arrays, flatten(abstract_params(vit_from_config(shapes))),
               f"a ViT ({shapes['width']} wide, {shapes['depth']} blocks, "
               f"{shapes['num_heads']} heads)")
    check_finite(arrays, path)  # before anything is written
    (out,) = _outputs(os.path.dirname(out) or ".", (os.path.basename(out),), overwrite)
    with _temporaries(out) as (tmp,):
        _write_npz(tmp, arrays)
    return {"out": out, "shapes": shapes}


# ------------------------------------------------------------------------------------------

def _outputs(folder: str, names, overwrite: bool) -> list[str]:
    paths = [os.path.join(folder, n) for n in names]
    existing = [p for p in paths if files.exists(p)]
    if existing and not overwrite:
        raise CheckpointError(f"{', '.join(existing)} already exist(s): pass --overwrite or "
                              "choose another --out")
    return paths


@contextlib.contextmanager
def _temporaries(*paths):
    """Temporary names beside `paths`, renamed over them once the block has written them all;
    on any failure (disk full, Ctrl-C) removed, the outputs untouched."""
    tmps = [f"{p}.{uuid.uuid4().hex[:8]}.partial" for p in paths]
    try:
        yield tmps
        for tmp, path in zip(tmps, paths):
            files.rename(tmp, path)
    except BaseException:
        for tmp in tmps:
            with contextlib.suppress(OSError):
                if files.exists(tmp):
                    files.remove(tmp)
        raise


def _write_npz(path: str, arrays: dict) -> None:
    """np.savez member by member (views are written without a full copy)."""
    with files.open_write(path) as f:
        np.savez(f, **arrays)
