"""Golden ViT outputs from an independent oracle (PyTorch + timm) for the Flax ViT tests.

For each configuration NAME this writes, under ``--out``:

* ``vit_NAME.npz``: random weights in the vit_jax / AugReg checkpoint layout
  (``embedding/kernel`` HWIO, ``Transformer/posembed_input/pos_embedding`` with the CLS row
  first, ``Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/...``, ...);
* ``vit_NAME_golden.npz``: ``images`` (NHWC float32 in [-1, 1]), ``logits`` and ``features``
  (pooled, normed pre-logit feature) computed by timm in fp32 eval mode;
* ``vit_NAME.json``: the model hyper-parameters, seed and oracle versions.

The checkpoint goes into timm through timm's own npz loader (``load_pretrained``), so the
name/transpose mapping of the layout is checked too, not only the forward pass.

Run it in its own virtual environment, never next to TensorFlow (importing TF and torch in
one process segfaulted)::

    python3 -m venv /work/oracle_venv
    /work/oracle_venv/bin/pip install -r tools/requirements-oracle.txt
    /work/oracle_venv/bin/python tools/make_vit_goldens.py --out tests/data

Versions used for the committed files: torch 2.13.0+cpu, timm 1.0.31, numpy 2.4.6
(torchvision 0.28.0 comes along with timm). Outputs are deterministic (fixed seeds, fixed
zip timestamps), so rerunning rewrites identical files.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

# The oracle must never reach the network (timm pulls in huggingface_hub).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def _import_timm():
    """Import timm, stubbing torchvision's C++ ops when its extension fails to load.

    timm imports torchvision; the PyPI torchvision wheel does not load its ``_C`` library
    beside the local CPU-only torch 2.13.0 build, and its import then dies registering fake
    kernels for ``torchvision::nms`` / ``qnms``. The ViT never calls them, so defining their
    schemas (no kernels) lets the import finish. Only done when the real import fails, since
    a working torchvision defines that namespace itself.
    """
    try:
        import torchvision  # noqa: F401
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        stub = torch.library.Library("torchvision", "DEF")
        stub.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        stub.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _import_timm.stub_library = stub  # keep the registration alive
    import timm
    from timm.models.vision_transformer import VisionTransformer

    return timm, VisionTransformer


timm, VisionTransformer = _import_timm()

BATCH = 4


@dataclasses.dataclass(frozen=True)
class ViTGoldenConfig:
    """One tiny ViT to build, run through timm and record."""

    name: str
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    image_size: int
    num_classes: int
    pool_type: str  # 'tok' (class token) or 'gap' (norm all tokens, then average)
    layernorm_epsilon: float
    gelu_approximate: bool  # True: tanh approximation, False: exact erf
    seed: int

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


CONFIGS = {
    c.name: c
    for c in (
        ViTGoldenConfig("tiny_tok", width=64, depth=2, num_heads=4, mlp_dim=128, patch_size=16,
                        image_size=32, num_classes=10, pool_type="tok", layernorm_epsilon=1e-6,
                        gelu_approximate=False, seed=0),
        ViTGoldenConfig("small_gap", width=96, depth=3, num_heads=3, mlp_dim=192, patch_size=8,
                        image_size=24, num_classes=7, pool_type="gap", layernorm_epsilon=1e-5,
                        gelu_approximate=True, seed=1),
        # The LPT numerics (eps 1e-5, exact GELU) on a class-token model.
        ViTGoldenConfig("tiny_tok_eps5", width=64, depth=2, num_heads=4, mlp_dim=128, patch_size=8,
                        image_size=16, num_classes=10, pool_type="tok", layernorm_epsilon=1e-5,
                        gelu_approximate=False, seed=2),
    )
}

# Std of each contribution to the residual stream (patch embedding, position embedding,
# CLS, attention and MLP outputs). Kept small so that the LayerNorm variance is ~1e-2 and
# epsilon 1e-5 vs 1e-6 visibly moves the logits; the parts stay comparable in size, so
# dropping or mis-wiring any of them changes the output too.
STREAM_STD = 0.05
# Mean MLP pre-activation, and the MLP output gain: the GELU output there is small while
# tanh and erf GELU still differ by ~3e-4, so the GELU form moves the logits by > 3e-3.
GELU_SHIFT = -2.0
MLP_OUT_GAIN = 10.0


def random_vit_jax_checkpoint(cfg: ViTGoldenConfig, rng: np.random.Generator) -> dict:
    """Random ViT weights keyed and shaped as a vit_jax / AugReg ``.npz`` checkpoint.

    Scales are chosen so every tensor matters: LayerNorm scales in [0.8, 1.2], nonzero
    biases, attention logits of order one (non-uniform attention), GELU inputs ~N(-2, 1).
    """
    d, m, h, p = cfg.width, cfg.mlp_dim, cfg.num_heads, cfg.patch_size
    hd = d // h
    s = STREAM_STD

    def normal(shape, std):
        return (std * rng.standard_normal(shape)).astype(np.float32)

    def norm_params(prefix):
        return {
            f"{prefix}/scale": rng.uniform(0.8, 1.2, (d,)).astype(np.float32),
            f"{prefix}/bias": normal((d,), 0.1),
        }

    fan_in = p * p * 3
    ckpt = {
        # Pixels are U[-1, 1] (variance 1/3); scale the kernel so patch tokens have std s.
        "embedding/kernel": normal((p, p, 3, d), s * np.sqrt(3.0 / fan_in)),
        "embedding/bias": normal((d,), s / 2),
        # vit_jax keeps the CLS position in row 0; a gap model has no CLS token or row.
        "Transformer/posembed_input/pos_embedding": normal(
            (1, cfg.num_patches + (cfg.pool_type == "tok"), d), s),
    }
    if cfg.pool_type == "tok":
        ckpt["cls"] = normal((1, 1, d), s)
    for i in range(cfg.depth):
        blk = f"Transformer/encoderblock_{i}"
        mha = f"{blk}/MultiHeadDotProductAttention_1"
        ckpt.update(norm_params(f"{blk}/LayerNorm_0"))
        for proj in ("query", "key", "value"):
            ckpt[f"{mha}/{proj}/kernel"] = normal((d, h, hd), d ** -0.5)
            ckpt[f"{mha}/{proj}/bias"] = normal((h, hd), 0.1)
        ckpt[f"{mha}/out/kernel"] = normal((h, hd, d), s * d ** -0.5)
        ckpt[f"{mha}/out/bias"] = normal((d,), s / 2)
        ckpt.update(norm_params(f"{blk}/LayerNorm_2"))
        # Pre-activations ~N(-2, 1): mostly where tanh and erf GELU differ most relative to
        # the GELU output, with a positive tail so the MLP is not a near-linear map.
        ckpt[f"{blk}/MlpBlock_3/Dense_0/kernel"] = normal((d, m), d ** -0.5)
        ckpt[f"{blk}/MlpBlock_3/Dense_0/bias"] = (GELU_SHIFT + normal((m,), 0.5)).astype(np.float32)
        ckpt[f"{blk}/MlpBlock_3/Dense_1/kernel"] = normal((m, d), MLP_OUT_GAIN * s * m ** -0.5)
        ckpt[f"{blk}/MlpBlock_3/Dense_1/bias"] = normal((d,), s / 2)
    ckpt.update(norm_params("Transformer/encoder_norm"))
    ckpt["head/kernel"] = normal((d, cfg.num_classes), 2 * d ** -0.5)
    ckpt["head/bias"] = normal((cfg.num_classes,), 0.1)
    return ckpt


def random_images(cfg: ViTGoldenConfig, rng: np.random.Generator) -> np.ndarray:
    """A batch of NHWC float32 images, uniform in [-1, 1] like the model's preprocessed input."""
    shape = (BATCH, cfg.image_size, cfg.image_size, 3)
    return rng.uniform(-1.0, 1.0, shape).astype(np.float32)


def build_timm_vit(cfg: ViTGoldenConfig) -> torch.nn.Module:
    """The timm ViT matching ``cfg``, in eval mode."""
    gap = cfg.pool_type == "gap"
    model = VisionTransformer(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_classes=cfg.num_classes,
        embed_dim=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_dim / cfg.width,
        qkv_bias=True,
        class_token=not gap,
        # big_vision / vit_jax 'gap': final norm on every token, then the mean (no fc_norm).
        global_pool="avg" if gap else "token",
        fc_norm=False,
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=cfg.layernorm_epsilon),
        act_layer=functools.partial(
            torch.nn.GELU, approximate="tanh" if cfg.gelu_approximate else "none"),
    )
    _check_timm_structure(model, cfg)
    return model.eval()


def _check_timm_structure(model: torch.nn.Module, cfg: ViTGoldenConfig) -> None:
    """Fail if timm silently built something other than what ``cfg`` describes."""
    assert model.blocks[0].mlp.fc1.out_features == cfg.mlp_dim
    assert model.num_prefix_tokens == (1 if cfg.pool_type == "tok" else 0)
    assert isinstance(model.fc_norm, torch.nn.Identity), "gap must norm tokens before pooling"
    norms = [mod for mod in model.modules() if isinstance(mod, torch.nn.LayerNorm)]
    assert len(norms) == 2 * cfg.depth + 1
    assert all(mod.eps == cfg.layernorm_epsilon for mod in norms)
    gelus = [mod for mod in model.modules() if isinstance(mod, torch.nn.GELU)]
    assert len(gelus) == cfg.depth
    assert all(g.approximate == ("tanh" if cfg.gelu_approximate else "none") for g in gelus)


@torch.no_grad()
def load_with_timm(model: torch.nn.Module, checkpoint_path: Path) -> None:
    """Load the npz with timm's own vit_jax loader and check it set every parameter.

    Parameters are filled with NaN first: any one the loader skips (e.g. a head whose
    shape does not match is silently kept) stays NaN and fails the check.
    """
    for param in model.parameters():
        param.fill_(float("nan"))
    model.load_pretrained(str(checkpoint_path))
    missed = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if missed:
        raise RuntimeError(f"timm's loader left these parameters unset: {missed}")


@torch.no_grad()
def run_timm(model: torch.nn.Module, images_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fp32 logits and pooled, normed pre-logit features for NHWC images."""
    x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).contiguous()  # timm wants NCHW
    tokens = model.forward_features(x)
    features = model.forward_head(tokens, pre_logits=True)
    logits = model.forward_head(tokens)
    torch.testing.assert_close(logits, model(x), rtol=0, atol=0)
    return logits.numpy().astype(np.float32), features.numpy().astype(np.float32)


def save_npz_deterministic(path: Path, arrays: dict) -> None:
    """Like ``np.savez`` (readable by ``np.load``) but byte-identical across runs.

    ``np.savez`` stamps each member with the current time; a fixed timestamp keeps
    regenerated fixtures out of version-control diffs.
    """
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            zf.writestr(info, buf.getvalue())


def config_record(cfg: ViTGoldenConfig) -> dict:
    """The JSON description of a golden configuration."""
    record = dataclasses.asdict(cfg)
    record.update(
        hidden_size=cfg.width,
        checkpoint_layout="vit_jax",
        batch=BATCH,
        input_range=[-1.0, 1.0],
        image_layout="NHWC",
        timm_version=timm.__version__,
        torch_version=torch.__version__,
        numpy_version=np.__version__,
    )
    return record


def make_golden(cfg: ViTGoldenConfig, out_dir: Path) -> dict:
    """Write the checkpoint, golden outputs and JSON for ``cfg``; return a short summary."""
    rng = np.random.default_rng(cfg.seed)
    checkpoint = random_vit_jax_checkpoint(cfg, rng)
    images = random_images(cfg, rng)

    ckpt_path = out_dir / f"vit_{cfg.name}.npz"
    save_npz_deterministic(ckpt_path, checkpoint)
    model = build_timm_vit(cfg)
    load_with_timm(model, ckpt_path)
    logits, features = run_timm(model, images)

    save_npz_deterministic(out_dir / f"vit_{cfg.name}_golden.npz",
                           {"images": images, "logits": logits, "features": features})
    record = config_record(cfg)
    (out_dir / f"vit_{cfg.name}.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return {"name": cfg.name, "logits": logits.shape, "max_abs_logit": float(np.abs(logits).max()),
            "features": features.shape}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/data"), help="output folder")
    parser.add_argument("--only", nargs="*", choices=sorted(CONFIGS), help="configs to (re)make")
    args = parser.parse_args(argv)

    torch.manual_seed(0)  # only timm's (overwritten) init draws from it
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only or sorted(CONFIGS):
        print(make_golden(CONFIGS[name], args.out))


if __name__ == "__main__":
    main()
