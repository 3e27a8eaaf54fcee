"""Golden SigLIP tower outputs from two independent oracles (timm, open_clip) for tests/test_siglip.py.

Writes, under ``--out``:

* ``siglip_tiny.npz``: random weights of a tiny SigLIP two-tower model in big_vision's
  layout: ``params/img/...`` (image ViT: no class token, ``MAPHead_0/{probe,
  MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0}``, no head, blocks unscanned),
  ``params/txt/...`` (text transformer: ``Embed_0/embedding``, ``pos_embedding``,
  ``Encoder_0/encoderblock/...`` in the scan layout, i.e. with the depth as the leading axis,
  ``Encoder_0/encoder_norm``, ``head``), ``params/t`` and ``params/b``;
* ``siglip_tiny_golden.npz``: ``images`` (NHWC in [-1, 1]), ``tokens`` (int32 ids, big_vision's
  sticky-EOS layout), ``image_features_timm``, ``image_features_open_clip`` (the MAP-pooled
  image embeddings) and ``text_embeddings_open_clip`` (the projected text embeddings);
* ``siglip_tiny.json``: sizes, token conventions, seed and oracle versions.

Both oracles read the file with their own big_vision loaders: timm's
``VisionTransformer(class_token=False, global_pool='map', act_layer='gelu_tanh')`` through
``load_pretrained`` (its ``_load_weights`` finds the ``params/img/`` prefix), and open_clip's
``CustomTextCLIP`` (a timm trunk registered under a test name + open_clip's text transformer)
through ``open_clip.convert.load_big_vision_weights`` (both towers, ``t`` and ``b``). Every
oracle parameter is NaN before loading, so one the loader skips fails the run. The text tower
gets token ids, not strings: the tokenizer is not part of the comparison.

SigLIP's numerics, as in big_vision: tanh GELU everywhere (MAP MLP too) and LayerNorm
epsilon 1e-6. open_clip's SigLIP configs leave the text GELU exact (an open_clip deviation
from big_vision); here the text tower is built with ``act_kwargs={'approximate': 'tanh'}``.

Run in the oracle venv (never beside TensorFlow), like tools/make_vit_goldens.py::

    /work/oracle_venv/bin/python tools/make_siglip_goldens.py --out tests/data

Versions used for the committed files: torch 2.13.0+cpu, timm 1.0.31, open_clip_torch 3.3.0,
numpy 2.4.6. Deterministic (fixed seeds, fixed zip timestamps): a rerun rewrites identical
files. Never touches the network.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Sets HF_HUB_OFFLINE, imports torch and timm (stubbing torchvision's C++ ops if needed).
import open_clip  # noqa: E402
from make_vit_goldens import (  # noqa: E402
    GELU_SHIFT,
    MLP_OUT_GAIN,
    STREAM_STD,
    VisionTransformer,
    save_npz_deterministic,
    timm,
    torch,
)
from open_clip.convert import load_big_vision_weights  # noqa: E402

SEED = 13
IMAGE = dict(width=48, depth=2, num_heads=4, mlp_dim=96, patch_size=8, image_size=32)
TEXT = dict(width=32, depth=2, num_heads=2, mlp_dim=64, vocab_size=64, max_len=8)
EMBED_DIM = IMAGE["width"]   # SigLIP: the text head projects into the image feature width
EOS_ID = 1                   # big_vision c4_en: pad 0, eos 1, unk 2; SigLIP pads with eos
NUM_IMAGES, NUM_TEXTS = 4, 5
EPS = 1e-6
TIMM_NAME = "vit_siglip_golden_tiny"


def _normal(rng, shape, std):
    return (std * rng.standard_normal(shape)).astype(np.float32)


def _block(rng, prefix: str, d: int, m: int, h: int) -> dict:
    """One pre-norm encoder block in big_vision names, scaled as make_vit_goldens does: a
    small residual stream (LayerNorm epsilon shows), MLP pre-activations ~N(-2, 1) (the GELU
    form shows), non-uniform attention."""
    s, hd = STREAM_STD, d // h
    out = {}
    for ln in ("LayerNorm_0", "LayerNorm_1"):
        out[f"{prefix}/{ln}/scale"] = rng.uniform(0.8, 1.2, (d,)).astype(np.float32)
        out[f"{prefix}/{ln}/bias"] = _normal(rng, (d,), 0.1)
    mha = f"{prefix}/MultiHeadDotProductAttention_0"
    for proj in ("query", "key", "value"):
        out[f"{mha}/{proj}/kernel"] = _normal(rng, (d, h, hd), d ** -0.5)
        out[f"{mha}/{proj}/bias"] = _normal(rng, (h, hd), 0.1)
    out[f"{mha}/out/kernel"] = _normal(rng, (h, hd, d), s * d ** -0.5)
    out[f"{mha}/out/bias"] = _normal(rng, (d,), s / 2)
    out[f"{prefix}/MlpBlock_0/Dense_0/kernel"] = _normal(rng, (d, m), d ** -0.5)
    out[f"{prefix}/MlpBlock_0/Dense_0/bias"] = (GELU_SHIFT + _normal(rng, (m,), 0.5)).astype(
        np.float32)
    out[f"{prefix}/MlpBlock_0/Dense_1/kernel"] = _normal(rng, (m, d), MLP_OUT_GAIN * s * m ** -0.5)
    out[f"{prefix}/MlpBlock_0/Dense_1/bias"] = _normal(rng, (d,), s / 2)
    return out


def _norm(rng, prefix: str, d: int) -> dict:
    return {f"{prefix}/scale": rng.uniform(0.8, 1.2, (d,)).astype(np.float32),
            f"{prefix}/bias": _normal(rng, (d,), 0.1)}


def image_tower(rng) -> dict:
    d, m, h, p = IMAGE["width"], IMAGE["mlp_dim"], IMAGE["num_heads"], IMAGE["patch_size"]
    n = (IMAGE["image_size"] // p) ** 2
    s = STREAM_STD
    out = {"embedding/kernel": _normal(rng, (p, p, 3, d), s * np.sqrt(3.0 / (p * p * 3))),
           "embedding/bias": _normal(rng, (d,), s / 2),
           "pos_embedding": _normal(rng, (1, n, d), s)}
    for i in range(IMAGE["depth"]):
        out.update(_block(rng, f"Transformer/encoderblock_{i}", d, m, h))
    out.update(_norm(rng, "Transformer/encoder_norm", d))
    # The MAP head: its probe is a query of order one, so attention over the tokens is not
    # uniform; its MLP is a block MLP (tanh GELU) behind its own LayerNorm.
    mha = {k.replace("X/", "MAPHead_0/"): v for k, v in _block(rng, "X", d, m, h).items()
           if "LayerNorm_1" not in k}
    out.update(mha)
    out["MAPHead_0/probe"] = _normal(rng, (1, 1, d), 1.0)
    return out


def text_tower(rng) -> dict:
    d, m, h = TEXT["width"], TEXT["mlp_dim"], TEXT["num_heads"]
    out = {"Embed_0/embedding": _normal(rng, (TEXT["vocab_size"], d), STREAM_STD),
           "pos_embedding": _normal(rng, (1, TEXT["max_len"], d), STREAM_STD)}
    blocks = [_block(rng, "B", d, m, h) for _ in range(TEXT["depth"])]
    for key in blocks[0]:  # scan layout: one stacked array per block parameter
        out["Encoder_0/encoderblock/" + key[2:]] = np.stack([b[key] for b in blocks])
    out.update(_norm(rng, "Encoder_0/encoder_norm", d))
    out["head/kernel"] = _normal(rng, (d, EMBED_DIM), 0.5 * d ** -0.5)  # embeddings ~N(0, 1/4)
    out["head/bias"] = _normal(rng, (EMBED_DIM,), 0.1)
    return out


def two_tower_checkpoint(rng) -> dict:
    ckpt = {f"params/img/{k}": v for k, v in image_tower(rng).items()}
    ckpt.update({f"params/txt/{k}": v for k, v in text_tower(rng).items()})
    ckpt["params/t"] = np.array([np.log(10.0)], np.float32)
    ckpt["params/b"] = np.array([-10.0], np.float32)
    return ckpt


def sticky_eos_tokens(rng) -> np.ndarray:
    """Ids as big_vision's tokenize(eos='sticky', pad_value=eos) lays them out: pieces (ids
    >= 3), the end token, end-token padding; one row fills max_len exactly."""
    rows = []
    for length in (1, 3, 5, TEXT["max_len"] - 1, 2):
        ids = list(rng.integers(3, TEXT["vocab_size"], length)) + [EOS_ID]
        rows.append(ids + [EOS_ID] * (TEXT["max_len"] - len(ids)))
    return np.asarray(rows[:NUM_TEXTS], np.int32)


def _vit_kwargs():
    return dict(img_size=IMAGE["image_size"], patch_size=IMAGE["patch_size"],
                embed_dim=IMAGE["width"], depth=IMAGE["depth"], num_heads=IMAGE["num_heads"],
                mlp_ratio=IMAGE["mlp_dim"] / IMAGE["width"], qkv_bias=True, class_token=False,
                global_pool="map", act_layer="gelu_tanh",
                norm_layer=functools.partial(torch.nn.LayerNorm, eps=EPS))


@timm.models.register_model
def vit_siglip_golden_tiny(pretrained=False, **kwargs):  # the name open_clip asks timm for
    del pretrained
    chosen = {k: kwargs[k] for k in ("num_classes", "global_pool") if k in kwargs}
    return VisionTransformer(**{**_vit_kwargs(), **chosen})


def _fill_nan(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))


def _check_all_loaded(model, who: str) -> None:
    missed = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if missed:
        raise RuntimeError(f"{who} left these parameters unset: {missed}")


@torch.no_grad()
def run_timm(path: Path, images: np.ndarray) -> np.ndarray:
    model = VisionTransformer(num_classes=0, **_vit_kwargs()).eval()
    assert model.num_prefix_tokens == 0 and model.attn_pool is not None
    assert isinstance(model.fc_norm, torch.nn.Identity), "the final norm must come before MAP"
    _fill_nan(model)
    model.load_pretrained(str(path))
    _check_all_loaded(model, "timm's load_pretrained")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return model(x).numpy().astype(np.float32)


def build_open_clip():
    vision_cfg = dict(timm_model_name=TIMM_NAME, timm_model_pretrained=False, timm_pool="map",
                      timm_proj="none", image_size=IMAGE["image_size"])
    text_cfg = dict(context_length=TEXT["max_len"], vocab_size=TEXT["vocab_size"],
                    width=TEXT["width"], heads=TEXT["num_heads"], layers=TEXT["depth"],
                    mlp_ratio=TEXT["mlp_dim"] / TEXT["width"], no_causal_mask=True,
                    proj_bias=True, pool_type="last", norm_kwargs={"eps": EPS},
                    act_kwargs={"approximate": "tanh"})
    model = open_clip.CustomTextCLIP(embed_dim=EMBED_DIM, vision_cfg=vision_cfg,
                                     text_cfg=text_cfg, init_logit_bias=-10.0)
    gelus = [m for m in model.text.modules() if isinstance(m, torch.nn.GELU)]
    assert len(gelus) == TEXT["depth"] and all(g.approximate == "tanh" for g in gelus)
    assert all(m.eps == EPS for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    return model.eval()


@torch.no_grad()
def run_open_clip(path: Path, images: np.ndarray, tokens: np.ndarray):
    model = build_open_clip()
    _fill_nan(model)
    load_big_vision_weights(model, str(path))
    _check_all_loaded(model, "open_clip's load_big_vision_weights")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    img = model.encode_image(x).numpy().astype(np.float32)
    txt = model.encode_text(torch.from_numpy(tokens.astype(np.int64))).numpy().astype(np.float32)
    return img, txt


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/data"), help="output folder")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)  # only the oracles' (overwritten) inits draw from it

    rng = np.random.default_rng(SEED)
    ckpt = two_tower_checkpoint(rng)
    shape = (NUM_IMAGES, IMAGE["image_size"], IMAGE["image_size"], 3)
    images = rng.uniform(-1.0, 1.0, shape).astype(np.float32)
    tokens = sticky_eos_tokens(rng)

    path = args.out / "siglip_tiny.npz"
    save_npz_deterministic(path, ckpt)
    feats_timm = run_timm(path, images)
    feats_oc, text_oc = run_open_clip(path, images, tokens)
    save_npz_deterministic(args.out / "siglip_tiny_golden.npz", {
        "images": images, "tokens": tokens, "image_features_timm": feats_timm,
        "image_features_open_clip": feats_oc, "text_embeddings_open_clip": text_oc})
    record = dict(seed=SEED, image=IMAGE, text=TEXT, embed_dim=EMBED_DIM, eos_id=EOS_ID,
                  pad_id=EOS_ID, layernorm_epsilon=EPS, gelu_approximate=True,
                  image_pool_type="map", text_pool_type="last", input_range=[-1.0, 1.0],
                  image_layout="NHWC", text_blocks_layout="scan",
                  timm_version=timm.__version__, torch_version=torch.__version__,
                  open_clip_version=open_clip.__version__, numpy_version=np.__version__)
    (args.out / "siglip_tiny.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    print({"timm vs open_clip image": float(np.abs(feats_timm - feats_oc).max()),
           "max |image feature|": float(np.abs(feats_timm).max()),
           "max |text embedding|": float(np.abs(text_oc).max()),
           "bytes": path.stat().st_size})


if __name__ == "__main__":
    main()
