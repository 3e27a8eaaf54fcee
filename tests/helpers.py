"""Constants and plain helpers shared by the tests (fixtures live in conftest.py).

Importable as `helpers` from every test module (pyproject.toml puts tests/ on the path) and
from the scripts the tests launch (tiny_cli_config.py, multiprocess_worker.py add tests/).
No JAX import here: conftest.py must set JAX's device flags before JAX starts.
"""

import glob
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
DATA = TESTS / "data"  # ViT goldens (tools/make_vit_goldens.py)
CONFIGS = REPO / "configs"

# ../shared beside the repository holds data that is not in git. It exists on the project's
# machines and in CI, not in a user's clone, where the tests that need it skip (through
# `require_shared`). LPT_TEST_SHARED points the tests at another copy (or at none, to see
# the skips).
SHARED = Path(os.environ.get("LPT_TEST_SHARED") or REPO.parent / "shared")
CIFAR10_TARBALL = SHARED / "data" / "images" / "cifar10-jpg.tar.gz"
SHARED_SPLITS = SHARED / "data" / "splits"  # the original LT split lists


def require_shared(path: Path, what: str) -> Path:
    """`path` (under SHARED), or skips the calling test with the one reason all such skips use."""
    if not path.exists():
        shown = path if os.environ.get("LPT_TEST_SHARED") else os.path.relpath(path, REPO)
        pytest.skip(f"{shown} ({what}) is absent: it exists on the project's machines and in "
                    f"CI; LPT_TEST_SHARED=<a copy of ../shared> runs these tests")
    return path


# ------------------------------------------------------------------------------------------
# The tiny ViT. TINY_BLOCK is the encoder block every tiny ViT of the tests uses; TINY_VIT is
# the trainer runs' and model tests' ViT in config.model.vit form (configs/common.py).

TINY_BLOCK = dict(width=32, num_heads=2, mlp_dim=64)
TINY_VIT = dict(variant=None, **TINY_BLOCK, depth=4, patch_size=8, image_size=32,
                pool_type="tok", representation_size=0, layernorm_epsilon=1e-5,
                gelu_approximate=False, dtype="float32", remat=False, attention="auto",
                matmul_precision="float32")


def vit_kwargs(spec: dict) -> dict:
    """The sizes of a config.model.vit-form spec as keyword arguments of backbones.vit.ViT."""
    return dict(image_size=(spec["image_size"],) * 2, patch_size=(spec["patch_size"],) * 2,
                width=spec["width"], depth=spec["depth"], mlp_dim=spec["mlp_dim"],
                num_heads=spec["num_heads"], layernorm_epsilon=spec["layernorm_epsilon"])


# ------------------------------------------------------------------------------------------
# A synthetic image folder (the image_folder source's layout).

TRAIN_COUNTS = (24, 12, 6, 3)
COLORS = ((200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40))


def make_image_folder(root, counts=TRAIN_COUNTS, eval_per_class=4, seed=0, ext="png"):
    """root/{train,val,test}/class_<c>/<i>.<ext>: 36x36 noisy colour patches, learnable, so
    the loss has somewhere to go. PNG is lossless; ext='jpg' writes JPEGs (quality 90), the
    format whose truncation the decoders must report. Returns `root` as a Path."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    options = {} if ext == "png" else {"quality": 90}
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", counts), ("val", [eval_per_class] * len(counts)),
                             ("test", [eval_per_class] * len(counts))):
        for c, n in enumerate(per_class):
            d = Path(root) / split / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            colour = np.array(COLORS[c % len(COLORS)])[None, None]
            for i in range(n):
                img = np.clip(colour + rng.normal(0, 50, (36, 36, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.{ext}", **options)
    return Path(root)


# ------------------------------------------------------------------------------------------
# Configs and run outputs.

def load_config(path, arg=None):
    """A config file's get_config(), loaded by file path as ml_collections' config_flags
    loads it (not through sys.path): get_config() without `arg`, get_config(arg) with it."""
    spec = importlib.util.spec_from_file_location(f"{Path(path).stem}_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)


def tb_scalars(logdir, tag):
    """(step, value) pairs of a scalar tag in a TensorBoard log folder (clu's event files),
    sorted by step."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    out = []
    for path in sorted(glob.glob(os.path.join(str(logdir), "events.out.tfevents.*"))):
        for raw in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(raw.numpy())
            for v in event.summary.value:
                if v.tag == tag:
                    out.append((event.step, float(tf.make_ndarray(v.tensor))))
    return sorted(out)
