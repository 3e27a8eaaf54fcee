"""A phase's result as one small .npz: the trained prompts/pool/keys/head (never the backbone)
plus JSON meta (method, phase, step, config, class names, the backbone file's identity). Eval,
predict, serving and a later phase load it next to the backbone; nothing in it is trusted
without a check: its keys and shapes against the model, its values for finiteness, its class
names against the data, and the settings no shape shows (the fields declared EXPORTED) against
the run's config."""

from __future__ import annotations

import io
import json
from typing import Mapping, Optional

import jax
import numpy as np

from lpt_jax import tree
from lpt_jax.config import schema
from lpt_jax.config.fields import EXPORTED
from lpt_jax.errors import CheckpointError, ConfigError, ExportError, Setting
from lpt_jax.method import registry
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
    phase_of(path, meta)
    return tree.unflatten(arrays), meta


def phase_of(path: str, meta: Mapping):
    """(method, phase) an export's meta names (exports written before methods were named
    hold an LPT phase)."""
    try:
        method = registry.get(meta.get("method", "lpt"))
        return method, method.phase(meta.get("phase"))
    except ConfigError:
        raise ExportError(f"{path}: the export's meta names method {meta.get('method', 'lpt')!r}"
                          f", phase {meta.get('phase')!r}, which this lpt_jax does not have "
                          f"(methods: {registry.known()})", path=path) from None


def check_class_names(path: str, theirs, ours) -> None:
    theirs, ours = [str(n) for n in theirs], [str(n) for n in ours]
    if theirs == ours:
        return
    if len(theirs) != len(ours):
        detail = f"{len(theirs)} classes in the export, {len(ours)} in the data"
    else:
        i = next(i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b)
        detail = f"label {i} is {theirs[i]!r} in the export and {ours[i]!r} in the data"
    raise ExportError(f"{path} was trained on other classes or another class order ({detail})",
                      path=path, hint=("use the data it was trained on, or pass ",
                                       Setting("eval.allow_other_class_names", True)))


def check_model(path: str, meta: Mapping, config) -> None:
    """The export's settings that no shape shows (the fields declared EXPORTED) equal this
    run's `config`; a field the export's recorded config lacks is judged by its shapes."""
    theirs = meta.get("config")
    if not isinstance(theirs, Mapping):
        return
    differ = []
    for field in schema.fields(config, EXPORTED):
        a, b = tree.lookup(theirs, field, None), tree.lookup(config, field, None)
        if a is not None and b is not None and a != b:
            differ.append((field, a, b))
    if differ:
        was = ", ".join(f"{f}={a!r}" for f, a, _ in differ)
        now = ", ".join(f"{b!r}" for _, _, b in differ)
        fixes = [part for f, a, _ in differ for part in (" ", Setting(f, a))]
        raise ExportError(f"{path} was trained with {was}; this run has {now}", path=path,
                          field=differ[0][0], hint=("pass", *fixes))


def check_backbone(path: str, recorded, backbone_path: str, ours: Mapping,
                   task: Optional[str] = None) -> None:
    """The export was trained on this backbone file (the identity in its meta equals `ours`,
    `file_fingerprint(backbone_path)`): prompts only work on the backbone they were trained
    with. The same policy for single-task evaluation and prediction and for serving."""
    who = f"{path} (task {task!r})" if task else path
    if not isinstance(recorded, Mapping) or not recorded.get("sha256_head_tail"):
        raise ExportError(f"{who} records no backbone identity, so nothing shows it was "
                          f"trained on {backbone_path}; export it again with this lpt_jax",
                          path=path)
    # The whole file's hash; exports written before it existed record their first and last
    # MiB only, and are judged by that.
    key = "sha256" if recorded.get("sha256") else "sha256_head_tail"
    if (recorded.get(key), recorded.get("size")) != (ours[key], ours["size"]):
        raise ExportError(
            f"{who} was trained on another backbone ({recorded.get('path')}, "
            f"{recorded.get('size')} bytes, fingerprint {str(recorded[key])[:12]}) "
            f"than {backbone_path} ({ours['size']} bytes, fingerprint "
            f"{ours[key][:12]}): prompts only work on the backbone they were "
            "trained with", path=path, hint=("point ", Setting("backbone.checkpoint"),
                                             " at the file it was trained on"))


def exported_subtree(params: Mapping, phase, method=None) -> dict:
    """What `phase`'s export holds of `params` (lpt_jax.method.registry.Method.exported_patterns)."""
    method = registry.get(method or "lpt")
    return tree.split(params, method.exported_patterns(phase))[0]


def apply(params: Mapping, path: str, phase=None, class_names=None,
          config: Optional[object] = None) -> tuple[dict, dict]:
    """`params` with the leaves of an export put in, and its meta. The export must hold
    exactly what its phase (or `phase`, when given) exports, in this model's shapes, with
    finite values, trained on `class_names` in this order and with the EXPORTED settings of
    `config` (when given)."""
    trained, meta = read(path)
    if class_names is not None and "class_names" in meta:
        check_class_names(path, meta["class_names"], class_names)
    if config is not None:
        check_model(path, meta, config)
    method, recorded = phase_of(path, meta)
    phase = phase or recorded
    expected = tree.flatten(tree.split(params, method.exported_patterns(phase))[0])
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
