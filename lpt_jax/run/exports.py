"""A phase's result as one small .npz: the trained prompts/pool/keys/head (never the backbone)
plus JSON meta (phase, step, config, class names, the backbone file's identity). Eval, predict
and phase 2 load it next to the backbone; nothing in it is trusted without a check."""

from __future__ import annotations

import io
import json
from typing import Mapping

import jax
import numpy as np

from lpt_jax import tree
from lpt_jax.errors import CheckpointError, ExportError
from lpt_jax.method.phases import PHASES
from lpt_jax.storage import files
from lpt_jax.weights.npz import read_npz

META_KEY = "__lpt_meta__"
VERSION = 1


def write(path: str, trained: Mapping, meta: Mapping) -> None:
    """Writes {path-named arrays} + JSON meta into one .npz, atomically."""
    flat = {k: np.asarray(jax.device_get(v)) for k, v in tree.flatten(trained).items()}
    meta = {**meta, "lpt_jax_export_version": VERSION}
    flat[META_KEY] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **flat)
    files.write_bytes(path, buf.getvalue())


def read(path: str) -> tuple[dict, dict]:
    """(nested trained params, meta) of an export; its meta must be readable and of a known
    version and phase."""
    try:
        arrays = read_npz(path)
    except CheckpointError as e:
        raise ExportError(str(e).replace("checkpoint", "export")) from None
    meta_bytes = arrays.pop(META_KEY, None)
    if meta_bytes is None:
        raise ExportError(f"{path} is not an lpt_jax export (no {META_KEY})")
    try:
        meta = json.loads(meta_bytes.tobytes().decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise ExportError(f"{path}: the export's meta is not readable JSON ({e})") from None
    version = meta.get("lpt_jax_export_version")
    if version != VERSION:
        raise ExportError(f"{path}: export version {version!r}, this lpt_jax reads "
                              f"version {VERSION}")
    if meta.get("phase") not in PHASES:
        raise ExportError(f"{path}: the export's meta names phase {meta.get('phase')!r}; "
                              f"known phases: {sorted(PHASES)}")
    return tree.unflatten(arrays), meta


def check_class_names(path: str, theirs, ours) -> None:
    theirs, ours = [str(n) for n in theirs], [str(n) for n in ours]
    if theirs == ours:
        return
    if len(theirs) != len(ours):
        detail = f"{len(theirs)} classes in the export, {len(ours)} in the data"
    else:
        i = next(i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b)
        detail = f"label {i} is {theirs[i]!r} in the export and {ours[i]!r} in the data"
    raise ExportError(f"{path} was trained on other classes or another class order ({detail}); "
                      "use the data it was trained on, or pass "
                      "--config.eval.allow_other_class_names=True")


# Model settings that change the outputs but no parameter's shape (a shape difference is
# caught leaf by leaf): an export means something only with the values it was trained with.
_SHAPELESS = ("backbone", "{backbone}.layernorm_epsilon", "{backbone}.gelu_approximate",
              "{backbone}.pool_type", "lpt.top_k", "lpt.prompt_position", "lpt.shared_depth")


def check_model(path: str, meta: Mapping, model: Mapping) -> None:
    """The export's model settings that no shape shows equal this run's `model` config
    (an export without a recorded model section is judged by its shapes alone)."""
    theirs = (meta.get("config") or {}).get("model")
    if not isinstance(theirs, Mapping):
        return
    backbone = str(tree.lookup(model, "backbone", None) or "vit")
    differ = []
    for dotted in _SHAPELESS:
        dotted = dotted.format(backbone=backbone)
        a, b = tree.lookup(theirs, dotted, None), tree.lookup(model, dotted, None)
        if a is not None and b is not None and a != b:
            differ.append((dotted, a, b))
    if differ:
        was = ", ".join(f"model.{f}={a!r}" for f, a, _ in differ)
        now = ", ".join(f"{b!r}" for _, _, b in differ)
        flags = " ".join(f"--config.model.{f}={a}" for f, a, _ in differ)
        raise ExportError(f"{path} was trained with {was}; this run has {now}: pass {flags}")


def exported_subtree(params: Mapping, phase) -> dict:
    return tree.split(params, phase.exported_patterns())[0]


def apply(params: Mapping, path: str, phase=None, class_names=None,
          model: Mapping | None = None) -> tuple[dict, dict]:
    """`params` with the leaves of an export put in, and its meta. The export must hold
    exactly what its phase (or `phase`, when given) exports, in this model's shapes, with
    finite values, trained on `class_names` in this order and with the settings of the
    `model` config section (when given)."""
    trained, meta = read(path)
    if class_names is not None and "class_names" in meta:
        check_class_names(path, meta["class_names"], class_names)
    if model is not None:
        check_model(path, meta, model)
    phase = phase or PHASES[meta["phase"]]
    expected = tree.flatten(exported_subtree(params, phase))
    got = tree.flatten(trained)
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        raise ExportError(
            f"{path} is not a complete phase-{phase.number} export for this model: "
            + "; ".join(f"{what}: {', '.join(keys)}" for what, keys in (
                ("missing", missing), ("unexpected", extra)) if keys))
    flat = tree.flatten(params)
    for key, value in got.items():
        if tuple(flat[key].shape) != tuple(value.shape):
            raise ExportError(f"{path}: {key} {tuple(value.shape)} does not fit this "
                                  f"model's {tuple(flat[key].shape)}")
        if not np.all(np.isfinite(value)):
            raise ExportError(f"{path}: {key} holds non-finite values")
        flat[key] = value
    return tree.unflatten(flat), meta
