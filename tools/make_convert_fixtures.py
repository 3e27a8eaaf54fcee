"""Fixtures for `lpt_jax.convert` from an independent writer and oracle (PyTorch + timm).

Writes, under ``--out`` (default ``tests/data/convert``):

* ``release_module.pth``: a tiny model in the PyTorch LPT release's checkpoint format, as its
  training script saves it: ``torch.save({'config': ..., 'state_dict': ..., 'val_acc': ...})``
  of a DataParallel model, so every key starts with ``module.``; the model is timm's
  ``VisionTransformer`` (head removed) plus the release's ``prompt_learner``
  (``Prompt_Tokens`` (depth, P, D), ``Prompt_Tokens_pool`` (M, depth-K, P, D),
  ``Prompt_Keys`` (M, D), ``head.weight`` (D, C) stored (in, out));
* ``release_plain.pth``: the same weights as ``{'state_dict': ...}`` without the prefix;
* ``release_golden.npz``: the release model's phase-2 outputs computed here in torch:
  ``pixels`` (B, H, W, 3) uint8, ``images`` (the same, normalised as the release does:
  (x / 255 - 0.5) / 0.5, NHWC float32), ``logits`` (B, C) cosines, ``indices`` (B, k) the
  selected pool entries, ``query`` (B, D) and ``match`` (scalar, mean over the batch of the
  summed top-k cosines);
* ``release.json``: sizes, heads, top-k, class names, seeds, versions;
* ``timm_vit.safetensors`` / ``timm_vit.bin`` (``torch.save(model.state_dict())``) /
  ``timm_vit_bf16.safetensors``: a timm ViT with a head, and ``timm_vit_golden.npz``
  (``images``, ``features``: pooled normed pre-logits, ``logits``) + ``timm_vit.json``;
* ``malicious.pth``: a genuine torch.save archive whose pickle also calls ``os.mkdir
  ('lpt_jax_pwned')`` when unpickled by anything that trusts it.

The release forward is re-implemented here from the release's description (docs/spec.md §2,
the release's ``PromptModels_pool_eval/structure.py``) on top of timm's blocks: the query is
the final-norm CLS feature of a pass with the shared prompt appended at every block (dropped
after it); keys and query are L2-normalised, top-k per image, the selected pool entries are
averaged; the main pass appends the shared prompt at blocks < K and [shared ; group] from K
on; the head is normalize(feature) @ normalize(W, per column). Numerics as the release:
``nn.LayerNorm`` (eps 1e-5) everywhere, exact GELU, no dropout.

Run it in the oracle venv only (torch and TensorFlow in one process segfaulted); it never
imports lpt_jax and never touches the network::

    /work/oracle_venv/bin/python tools/make_convert_fixtures.py [--out tests/data/convert]

Versions used for the committed files: torch 2.13.0+cpu, timm 1.0.31, safetensors 0.8.0,
numpy 2.4.6. Deterministic: fixed seeds; rerunning rewrites identical files.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # timm pulls in huggingface_hub

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
# timm (with torchvision's C++ op schemas stubbed where the PyPI wheel cannot load them), as
# every oracle script imports it.
import safetensors  # noqa: E402
from make_vit_goldens import VisionTransformer, timm  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


@dataclasses.dataclass(frozen=True)
class ReleaseSetup:
    width: int = 32
    depth: int = 3
    num_heads: int = 2          # width 32 is no standard size: the reader needs num_heads=2
    mlp_dim: int = 64
    patch_size: int = 8
    image_size: int = 24
    prompt_length: int = 3
    pool_size: int = 5
    shared_depth: int = 1       # K: the pool covers blocks 1 and 2
    top_k: int = 2
    num_classes: int = 6
    batch: int = 6
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TimmSetup:
    width: int = 32
    depth: int = 2
    num_heads: int = 4          # not the release's 2: the loader must take the model's heads
    mlp_dim: int = 64
    patch_size: int = 8
    image_size: int = 16
    num_classes: int = 5
    layernorm_epsilon: float = 1e-6  # timm's default
    batch: int = 3
    seed: int = 1


STREAM_STD = 0.05     # residual contributions small, so LayerNorm eps 1e-5 vs 1e-6 shows
GELU_SHIFT = -2.0     # MLP pre-activations ~N(-2, 1): erf and tanh GELU differ visibly there
MLP_OUT_GAIN = 10.0


# ------------------------------------------------------------------------------------------
# Weights.

@torch.no_grad()
def randomise_vit(vit: nn.Module, rng: np.random.Generator) -> None:
    """Every ViT weight drawn at a scale where it shows in the outputs (see make_vit_goldens)."""
    d = vit.embed_dim
    s = STREAM_STD

    def fill(t, values):
        t.copy_(torch.from_numpy(np.asarray(values, np.float32).reshape(t.shape)))

    def normal(shape, std):
        return std * rng.standard_normal(shape)

    proj = vit.patch_embed.proj
    fan_in = proj.weight[0].numel()
    fill(proj.weight, normal(proj.weight.shape, s * np.sqrt(3.0 / fan_in)))
    fill(proj.bias, normal(proj.bias.shape, s / 2))
    fill(vit.pos_embed, normal(vit.pos_embed.shape, s))
    fill(vit.cls_token, normal(vit.cls_token.shape, s))
    norms = [m for m in vit.modules() if isinstance(m, nn.LayerNorm)]
    for m in norms:
        fill(m.weight, rng.uniform(0.8, 1.2, m.weight.shape))
        fill(m.bias, normal(m.bias.shape, 0.1))
    for blk in vit.blocks:
        fill(blk.attn.qkv.weight, normal(blk.attn.qkv.weight.shape, d ** -0.5))
        fill(blk.attn.qkv.bias, normal(blk.attn.qkv.bias.shape, 0.1))
        fill(blk.attn.proj.weight, normal(blk.attn.proj.weight.shape, s * d ** -0.5))
        fill(blk.attn.proj.bias, normal(blk.attn.proj.bias.shape, s / 2))
        m = blk.mlp.fc1.out_features
        fill(blk.mlp.fc1.weight, normal(blk.mlp.fc1.weight.shape, d ** -0.5))
        fill(blk.mlp.fc1.bias, GELU_SHIFT + normal((m,), 0.5))
        fill(blk.mlp.fc2.weight, normal(blk.mlp.fc2.weight.shape, MLP_OUT_GAIN * s * m ** -0.5))
        fill(blk.mlp.fc2.bias, normal(blk.mlp.fc2.bias.shape, s / 2))
    if isinstance(vit.head, nn.Linear):
        fill(vit.head.weight, normal(vit.head.weight.shape, 2 * d ** -0.5))
        fill(vit.head.bias, normal(vit.head.bias.shape, 0.1))


def random_pixels(batch: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NHWC pixels, and the release's input: ToTensor then Normalize(0.5, 0.5)."""
    pixels = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    images = ((pixels.astype(np.float32) / 255.0 - 0.5) / 0.5).astype(np.float32)
    return pixels, images


def nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------------
# The release's model: timm's ViT + prompt_learner, and its phase-2 forward.

class NormedLinear(nn.Module):
    """The release's cosine head: weight (in, out), normalised per output column."""

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width, num_classes))

    def forward(self, x):
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=0)


class PromptLearner(nn.Module):
    def __init__(self, s: ReleaseSetup):
        super().__init__()
        p, d = s.prompt_length, s.width
        self.Prompt_Tokens = nn.Parameter(torch.zeros(s.depth, p, d))
        self.Prompt_Tokens_pool = nn.Parameter(torch.zeros(s.pool_size, s.depth - s.shared_depth, p, d))
        self.Prompt_Keys = nn.Parameter(torch.zeros(s.pool_size, d))
        self.head = NormedLinear(d, s.num_classes)


class ReleaseModel(nn.Module):
    """Holds timm's ViT's parameters at the top level, as the release's VPT_ViT subclass does."""

    def __init__(self, s: ReleaseSetup):
        super().__init__()
        self.s = s
        vit = VisionTransformer(
            img_size=s.image_size, patch_size=s.patch_size, embed_dim=s.width, depth=s.depth,
            num_heads=s.num_heads, mlp_ratio=s.mlp_dim / s.width, qkv_bias=True, num_classes=0,
            global_pool="token", class_token=True, norm_layer=nn.LayerNorm, act_layer=nn.GELU)
        self.cls_token, self.pos_embed = vit.cls_token, vit.pos_embed
        self.patch_embed, self.blocks, self.norm = vit.patch_embed, vit.blocks, vit.norm
        self.vit_view = [vit]  # the ViT itself, unregistered (its names are ours already)
        self.prompt_learner = PromptLearner(s)

    def embed(self, x):
        x = self.patch_embed(x)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embed

    def run_block(self, i, x, extra):
        n = x.shape[1]
        return self.blocks[i](torch.cat([x, extra], dim=1))[:, :n]

    def query(self, x):
        x = self.embed(x)
        shared = self.prompt_learner.Prompt_Tokens
        for i in range(self.s.depth):
            x = self.run_block(i, x, shared[i].expand(x.shape[0], -1, -1))
        return self.norm(x)[:, 0]

    def forward(self, x):
        s, pl = self.s, self.prompt_learner
        query = self.query(x)
        q = F.normalize(query, dim=1)
        keys = F.normalize(pl.Prompt_Keys, dim=1)
        sims = q @ keys.t()
        _, idx = sims.topk(s.top_k, dim=1, largest=True, sorted=True)
        group = pl.Prompt_Tokens_pool[idx].mean(dim=1)            # (B, depth-K, P, D)
        match = (keys[idx] * q.unsqueeze(1)).sum() / x.shape[0]
        h = self.embed(x)
        b = h.shape[0]
        for i in range(s.depth):
            extra = pl.Prompt_Tokens[i].expand(b, -1, -1)
            if i >= s.shared_depth:
                extra = torch.cat([extra, group[:, i - s.shared_depth]], dim=1)
            h = self.run_block(i, h, extra)
        logits = pl.head(self.norm(h)[:, 0])
        return logits, idx, query, match, sims


def release_state_names(s: ReleaseSetup) -> set[str]:
    """The release's checkpoint keys (module. removed), written out from its structure."""
    names = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
             "norm.weight", "norm.bias"}
    for i in range(s.depth):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            names |= {f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"}
    names |= {f"prompt_learner.{n}" for n in ("Prompt_Tokens", "Prompt_Tokens_pool",
                                              "Prompt_Keys", "head.weight")}
    return names


@torch.no_grad()
def choose_keys(model: ReleaseModel, images: torch.Tensor, rng: np.random.Generator) -> None:
    """Keys near the (centred) queries of the golden images, so that different images pick
    different pool entries, with every top-k decision clear of fp32 rounding (gap > 1e-3)."""
    s = model.s
    q = F.normalize(model.query(images), dim=1).numpy()
    centred = q - q.mean(0, keepdims=True)
    for attempt in range(100):
        keys = centred[rng.permutation(len(q))[: s.pool_size]] + 0.3 * centred.std() * \
            rng.standard_normal((s.pool_size, s.width))
        sims = q @ (keys / np.linalg.norm(keys, axis=1, keepdims=True)).T
        order = np.sort(sims, axis=1)[:, ::-1]
        gap = float(np.min(order[:, s.top_k - 1] - order[:, s.top_k]))
        picks = {tuple(sorted(r)) for r in np.argsort(-sims, axis=1)[:, : s.top_k]}
        if gap > 1e-3 and len(picks) >= 3:
            model.prompt_learner.Prompt_Keys.copy_(torch.from_numpy(keys.astype(np.float32)))
            return
    raise RuntimeError("no key set gave clear, varied top-k choices")


def make_release(out: Path) -> dict:
    s = ReleaseSetup()
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    model = ReleaseModel(s).eval()
    randomise_vit(model.vit_view[0], rng)
    pl = model.prompt_learner
    with torch.no_grad():
        pl.Prompt_Tokens.copy_(torch.from_numpy(
            (STREAM_STD * rng.standard_normal(pl.Prompt_Tokens.shape)).astype(np.float32)))
        pl.Prompt_Tokens_pool.copy_(torch.from_numpy(
            (4 * STREAM_STD * rng.standard_normal(pl.Prompt_Tokens_pool.shape)).astype(np.float32)))
        pl.head.weight.copy_(torch.from_numpy(rng.standard_normal(pl.head.weight.shape).astype(np.float32)))
    pixels, images = random_pixels(s.batch, s.image_size, rng)
    x = nchw(images)
    choose_keys(model, x, rng)
    with torch.no_grad():
        logits, idx, query, match, sims = model(x)

    state = model.state_dict()
    assert set(state) == release_state_names(s), sorted(set(state) ^ release_state_names(s))
    # The release's training script saves a DataParallel model: every key gets `module.`.
    wrapped = {"config": {"dataset": "tiny", "prompt_length": s.prompt_length, "lr": 0.02},
               "state_dict": {f"module.{k}": v for k, v in state.items()}, "val_acc": 0.5}
    torch.save(wrapped, out / "release_module.pth")
    torch.save({"state_dict": dict(state)}, out / "release_plain.pth")
    save_npz(out / "release_golden.npz", dict(
        pixels=pixels, images=images, logits=logits.numpy(), indices=idx.numpy().astype(np.int32),
        query=query.numpy(), match=np.float32(match.item()), sims=sims.numpy()))
    class_names = [f"class_{c}" for c in range(s.num_classes)]
    (out / "release_classnames.txt").write_text("\n".join(class_names) + "\n")
    record = dict(dataclasses.asdict(s), layernorm_epsilon=1e-5, gelu_approximate=False,
                  class_names=class_names, **versions())
    (out / "release.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return {"release": tuple(logits.shape), "indices": idx.tolist(), "match": match.item()}


# ------------------------------------------------------------------------------------------
# A timm ViT with a head, as timm / Hugging Face ship it.

def make_timm(out: Path) -> dict:
    s = TimmSetup()
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    vit = VisionTransformer(
        img_size=s.image_size, patch_size=s.patch_size, embed_dim=s.width, depth=s.depth,
        num_heads=s.num_heads, mlp_ratio=s.mlp_dim / s.width, qkv_bias=True,
        num_classes=s.num_classes, global_pool="token", class_token=True).eval()
    assert all(m.eps == s.layernorm_epsilon for m in vit.modules() if isinstance(m, nn.LayerNorm))
    randomise_vit(vit, rng)
    _, images = random_pixels(s.batch, s.image_size, rng)
    with torch.no_grad():
        tokens = vit.forward_features(nchw(images))
        features = vit.forward_head(tokens, pre_logits=True)
        logits = vit.forward_head(tokens)
    state = {k: v.contiguous() for k, v in vit.state_dict().items()}
    save_file(state, str(out / "timm_vit.safetensors"), metadata={"format": "pt"})
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()},
              str(out / "timm_vit_bf16.safetensors"), metadata={"format": "pt"})
    torch.save(state, out / "timm_vit.bin")
    save_npz(out / "timm_vit_golden.npz", dict(images=images, features=features.numpy(),
                                               logits=logits.numpy()))
    (out / "timm_vit.json").write_text(json.dumps(
        dict(dataclasses.asdict(s), gelu_approximate=False, pool_type="tok", **versions()),
        indent=2, sort_keys=True) + "\n")
    return {"timm": tuple(logits.shape)}


# ------------------------------------------------------------------------------------------
# A torch.save file that runs code when a trusting reader unpickles it.

class Mkdir:
    """Unpickles as os.mkdir('lpt_jax_pwned'): a harmless, checkable side effect."""

    def __reduce__(self):
        return (os.mkdir, ("lpt_jax_pwned",))


def make_malicious(out: Path) -> dict:
    torch.save({"state_dict": {"cls_token": torch.zeros(1, 1, 4), "evil": Mkdir()}},
               out / "malicious.pth")
    return {"malicious": "os.mkdir"}


# ------------------------------------------------------------------------------------------

def save_npz(path: Path, arrays: dict) -> None:
    """np.savez, byte-identical across runs (fixed member timestamps)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.array(arrays[key], order="C"), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0)),
                        buf.getvalue())


def versions() -> dict:
    return dict(torch_version=torch.__version__, timm_version=timm.__version__,
                safetensors_version=safetensors.__version__, numpy_version=np.__version__)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("tests/data/convert"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for make in (make_release, make_timm, make_malicious):
        print(make(args.out))
    total = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"{total / 1024:.0f} KiB in {args.out}")


if __name__ == "__main__":
    main()
