"""Importing PyTorch weights: the LPT release's whole-model checkpoint and timm / Hugging Face
ViT state dicts, read without torch and without running anything from the file.

    from lpt_jax.convert import load_release
    model, params = load_release("LPT_places.pth")          # num_heads=, top_k= optional
    out = model.apply({"params": params}, images, method=LPT.phase2)   # NHWC in [-1, 1]

    python -m lpt_jax.convert release --checkpoint=LPT_places.pth --out=DIR
    python -m lpt_jax.convert backbone --checkpoint=model.safetensors --out=vit.npz

The ViT's loader (`lpt_jax.backbones.vit_weights`) reads `.safetensors` / `.pth` / `.pt` /
`.bin` timm ViT state dicts itself, so `backbone.checkpoint=model.safetensors` works like an
`.npz`. The files are read by `lpt_jax.weights` (the restricted torch.save reader, safetensors)
and renamed by `lpt_jax.backbones.vit_timm`. Modules here: `fit` (the model the shapes
describe, strict check), `release` (the release's layout and numerics), `writing` (the .npz
outputs). See docs/convert.md.
"""

from lpt_jax.convert.release import Release, load_release, read_release
from lpt_jax.convert.writing import convert_backbone, convert_release
from lpt_jax.weights.state_dict import SUFFIXES, is_torch_world, read_state_dict

__all__ = ["SUFFIXES", "Release", "convert_backbone", "convert_release", "is_torch_world",
           "load_release", "read_release", "read_state_dict"]
