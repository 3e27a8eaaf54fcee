"""PyTorch-world weight files -> flat {name: numpy array}: `.safetensors`, and `torch.save`
archives (`.pth`, `.pt`, `.bin`) holding a state dict, bare or under 'state_dict' / 'model',
with or without DataParallel's `module.` prefix."""

from __future__ import annotations

import numpy as np

from lpt_jax.errors import CheckpointError
from lpt_jax.storage import files
from lpt_jax.weights.npz import open_weights
from lpt_jax.weights.safetensors_file import read_safetensors
from lpt_jax.weights.torch_zip import read_torch_file

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SUFFIXES = SAFETENSORS_SUFFIXES + TORCH_SUFFIXES
_WRAPPERS = ("state_dict", "model")  # where training scripts keep the weights


def is_torch_world(path: str) -> bool:
    """True for the suffixes this package reads (the .npz loader handles the rest)."""
    return str(path).lower().endswith(SUFFIXES)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """The state dict of a .safetensors / torch.save file, `module.` prefixes removed."""
    if not is_torch_world(path):
        raise CheckpointError(f"{path}: expected a {', '.join(SUFFIXES)} file")
    f = open_weights(path)
    try:
        if str(path).lower().endswith(SAFETENSORS_SUFFIXES):
            return _checked_names(read_safetensors(path, f, files.size(path)), path)
        return _checked_names(_state_dict_in(read_torch_file(path, f, files.size(path)), path),
                              path)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    finally:
        f.close()


def _state_dict_in(obj, path: str) -> dict[str, np.ndarray]:
    if isinstance(obj, dict) and not _is_tensor_dict(obj):
        for key in _WRAPPERS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not _is_tensor_dict(obj):
        what = (f"a dict with the entries {sorted(str(k)[:40] for k in obj)[:8]}"
                if isinstance(obj, dict) else f"a {type(obj).__name__}")
        raise CheckpointError(f"{path} holds {what}, not a state dict (a dict of tensors, "
                              f"bare or under {' or '.join(repr(w) for w in _WRAPPERS)})")
    prefix = "module."  # torch.nn.DataParallel's
    if all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def _checked_names(arrays: dict[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
    """Names end up in one-line messages: no line breaks or other control characters."""
    bad = next((k for k in arrays if not k.isprintable()), None)
    if bad is not None:
        raise CheckpointError(f"{path} names a tensor with control characters ({bad[:60]!r})")
    return arrays


def _is_tensor_dict(d: dict) -> bool:
    return bool(d) and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in d.items())
