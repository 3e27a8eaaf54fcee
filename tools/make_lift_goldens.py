"""Golden outputs of LIFT's own PyTorch code (Shi et al., ICML 2024, github shijxcs/LIFT) on
shared random weights, for tests/test_lift_goldens.py (which runs our JAX LIFT on them).

LIFT's code is never copied into this repository: given ``--lift_repo`` (a LIFT checkout or a
bare clone), this script extracts the files it needs at run time (``git show REV:PATH``, or
the file itself when the folder is not a git repository) into a temporary folder and imports
them from there:

* ``models/`` (all of it: ``Peft_ViT``, ``ViT_Tuner``, ``PeftModelFromViT``, the modules,
  ``CosineClassifier``), ``utils/losses.py`` (``LogitAdjustedLoss``) and ``utils/config.py``
  (LIFT's default config: the cosine scale 25 comes from it), imported as they are;
* ``clip/model.py``, which ``models/peft_vit.py`` imports for its CLIP branch, with an EMPTY
  ``clip/__init__.py`` (stub): LIFT's own ``clip/__init__.py`` imports ``clip/clip.py``, which
  needs ftfy/regex and downloads CLIP weights, none of which is used here;
* ``trainer.py`` is NOT imported (it needs sklearn, tensorboard, the data sets, CLIP): the
  source of its ``Trainer.init_head_class_mean`` method is cut out with ``ast`` and run on an
  object carrying what that method reads (``model``, ``train_init_loader``, ``device``,
  ``num_classes``, ``head``).

What it writes (``--out``, default tests/data):

* ``lift_goldens.npz`` (deterministic zip), keys:
    ``vit/...``            a random ViT (width 32, depth 2, 4 heads, MLP 64, patch 4, 16 px,
                           class token, LayerNorm eps 1e-6 and exact GELU as timm's
                           ``vit_base_patch16_224``, which LIFT's IN21K-ViT runs) in the
                           vit_jax/AugReg npz layout (timm's npz loader reads it into a
                           ``VisionTransformer`` whose ``pos_embed`` has the class row, as
                           ``Peft_ViT`` needs; our loader reads it with ``subtree='vit'``);
    ``images_u8``          (B, 16, 16, 3) uint8; the model input is
                           ``u8.astype(float32) / float32(127.5) - float32(1)`` on both sides;
    ``<cfg>/tuner/<name>`` every parameter of LIFT's ``ViT_Tuner`` under its torch name
                           (``adaptformer_list.0.down_proj.weight``: torch Linear layout
                           (out, in)), set to random NON-ZERO values (LIFT starts its up
                           projections and LoRA's B at zero, which would test nothing);
    ``<cfg>/features``     ``model(x, return_feature=True)``: the tuned backbone's feature;
    ``<cfg>/logits``       ``model(x)``: LIFT's ``CosineClassifier`` (scale 25) on it;
    ``<cfg>/la_loss``      ``LogitAdjustedLoss(cls_num_list)(logits, labels)`` (tau 1);
    ``head_weight``        (C, D) the random head weight every configuration uses;
    ``class_counts``, ``labels``;
    ``train_images_u8``, ``train_labels``, ``class_mean_head`` (C, D): LIFT's
                           ``init_head_class_mean`` over a two-batch fake training set (the
                           PLAIN backbone's features, ``use_tuner=False``; normalised rows);
    ``tte/image`` a (23, 17, 3) uint8 image; ``tte/resized``: torchvision's
                           ``Resize(res + expand)`` of it (PIL); ``tte/five_crop``,
                           ``tte/ten_crop``: ``FiveCrop(res)`` / ``TenCrop(res)`` of that,
                           as LIFT's ``tte`` transforms (res 8, expand 2);
    ``init/<stat>``        statistics of LIFT's module initialisation, measured on large
                           freshly built modules (width 768, bottleneck 64): the std of
                           AdaptFormer's / Adapter's down projection, LoRA A's max |a| and
                           std, SSF's scale / shift mean and std, and flags that up
                           projections, biases and LoRA B start at zero;
* ``lift_goldens.json``: the configurations, sizes and the versions that made the file.

Configurations (``CONFIGS``): adaptformer, adapter, lora, ssf (``ssf_attn + ssf_mlp +
ssf_ln``), and all four together (the order in which LIFT composes them), bottleneck r = 4.

Run it in the oracle venv (see tools/requirements-oracle.txt; this script also needs yacs,
which LIFT's utils/config.py imports)::

    python3 -m venv /work/oracle-venv
    /work/oracle-venv/bin/pip install torch==2.13.0 timm==1.0.31 numpy==2.4.6 \\
        torchvision==0.28.0 yacs==0.1.8
    /work/oracle-venv/bin/python tools/make_lift_goldens.py \\
        --lift_repo=/work/.mirror/shijxcs+LIFT/repo --out tests/data

Versions used for the committed files: see tests/data/lift_goldens.json (torch 2.13.0+cpu,
timm 1.0.31, torchvision 0.28.0, Pillow 13.0.0, numpy 2.4.6, yacs 0.1.8, LIFT 661ead9).
Deterministic: rerunning rewrites identical files.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import platform
import subprocess
import sys
import tempfile
import types
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_vit_goldens as vg  # noqa: E402  (imports torch and timm, stubbing torchvision ops)
import PIL  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import transforms  # noqa: E402

# LIFT's files this script imports (see the docstring); the stubbed ones are written empty.
LIFT_FILES = ("models/__init__.py", "models/models.py", "models/peft_modules.py",
              "models/peft_vit.py", "models/peft_rn.py", "models/clip_text.py",
              "models/classifiers.py", "clip/model.py", "utils/losses.py", "utils/config.py")
STUBS = ("clip/__init__.py", "utils/__init__.py")

VIT = vg.ViTGoldenConfig("lift", width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=4,
                         image_size=16, num_classes=0, pool_type="tok",
                         layernorm_epsilon=1e-6, gelu_approximate=False, seed=7)
BOTTLENECK = 4
NUM_CLASSES = 5
BATCH = 6
TRAIN_BATCHES = (6, 4)         # the fake training set, as two loader batches
TTE = dict(image_hw=(23, 17), resolution=8, expand=2)
INIT_STATS = dict(width=768, bottleneck=64)
# name -> LIFT's config flags (utils/config.py) turned on.
CONFIGS = {
    "adaptformer": ("adaptformer",),
    "adapter": ("adapter",),
    "lora": ("lora",),
    "ssf": ("ssf_attn", "ssf_mlp", "ssf_ln"),
    "all": ("adapter", "adaptformer", "lora", "ssf_attn", "ssf_mlp", "ssf_ln"),
}


# ------------------------------------------------------------------------------------------
# LIFT's code, extracted at run time.

def _read_lift_file(repo: Path, rev: str, path: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(repo), "show", f"{rev}:{path}"], check=True,
                              capture_output=True, text=True).stdout
    except subprocess.CalledProcessError:
        if (repo / path).is_file():  # a plain copy of the files, not a git repository
            return (repo / path).read_text()
        raise


def lift_commit(repo: Path, rev: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", rev], check=True,
                              capture_output=True, text=True).stdout.strip()
    except subprocess.CalledProcessError:
        return "unknown (not a git repository)"


def import_lift(repo: Path, rev: str, into: Path) -> types.SimpleNamespace:
    """Writes LIFT's files (and the empty stubs) under `into`, imports them from there."""
    for path in LIFT_FILES:
        (into / path).parent.mkdir(parents=True, exist_ok=True)
        (into / path).write_text(_read_lift_file(repo, rev, path))
    for path in STUBS:
        (into / path).write_text("")
    for name in ("models", "clip", "utils"):
        if name in sys.modules:
            raise RuntimeError(f"a module {name!r} is already imported: run this script alone")
    sys.path.insert(0, str(into))
    import models  # noqa: F401
    from models.classifiers import CosineClassifier
    from models.models import PeftModelFromViT
    from models.peft_modules import SSF, Adapter, AdaptFormer, LoRA
    from utils.config import _C
    from utils.losses import LogitAdjustedLoss

    for mod in (models, sys.modules["utils.losses"]):
        assert str(into) in mod.__file__, f"{mod.__name__} was not imported from LIFT's files"
    trainer = _read_lift_file(repo, rev, "trainer.py")
    return types.SimpleNamespace(
        PeftModelFromViT=PeftModelFromViT, CosineClassifier=CosineClassifier, Adapter=Adapter,
        AdaptFormer=AdaptFormer, LoRA=LoRA, SSF=SSF, LogitAdjustedLoss=LogitAdjustedLoss,
        default_config=_C, init_head_class_mean=_trainer_method(trainer, "init_head_class_mean"))


def _trainer_method(source: str, name: str):
    """The function `name` of trainer.py's Trainer class, compiled alone (its body uses
    torch, F and tqdm only)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "Trainer":
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == name:
                    from tqdm import tqdm
                    namespace = {"torch": torch, "F": F, "tqdm": tqdm}
                    code = compile(ast.Module([item], type_ignores=[]), "LIFT/trainer.py", "exec")
                    exec(code, namespace)
                    return namespace[name]
    raise RuntimeError(f"LIFT's trainer.py has no Trainer.{name}")


# ------------------------------------------------------------------------------------------
# The model.

def lift_config(lift, flags):
    """LIFT's default config (utils/config.py) for an IN21K ViT with `flags` on."""
    cfg = lift.default_config.clone()
    cfg.defrost()
    cfg.backbone = "IN21K-ViT-B/16"
    cfg.classifier = "CosineClassifier"
    cfg.adapter_dim = BOTTLENECK
    for flag in flags:
        setattr(cfg, flag, True)
    cfg.freeze()
    return cfg


def build_timm_backbone(checkpoint_path: Path) -> torch.nn.Module:
    model = vg.build_timm_vit(VIT)  # (no head: num_classes 0)
    vg.load_with_timm(model, checkpoint_path)
    return model


def randomise_tuner(tuner: torch.nn.Module, rng: np.random.Generator) -> None:
    """Every tuner parameter to random non-zero values of a size that moves the feature."""
    d = VIT.width
    for name, p in tuner.named_parameters():
        leaf = name.split(".")[-1]
        shape = tuple(p.shape)
        if name.endswith("ln.weight"):
            value = rng.uniform(0.8, 1.2, shape)
        elif name.endswith("ln.bias"):
            value = rng.normal(0, 0.1, shape)
        elif name.endswith("down_proj.weight"):
            value = rng.normal(0, d ** -0.5, shape)
        elif name.endswith("down_proj.bias"):
            value = rng.normal(0, 0.3, shape)
        elif name.endswith("up_proj.weight"):
            value = rng.normal(0, 2 * vg.STREAM_STD * BOTTLENECK ** -0.5, shape)
        elif name.endswith("up_proj.bias"):
            value = rng.normal(0, vg.STREAM_STD / 2, shape)
        elif name.startswith("adaptformer_list") and leaf == "scale":
            value = rng.uniform(0.5, 1.5, shape)
        elif leaf == "lora_A":
            value = rng.normal(0, d ** -0.5, shape)
        elif leaf == "lora_B":
            value = rng.normal(0, BOTTLENECK ** -0.5, shape)
        elif leaf == "scale":  # SSF
            value = rng.normal(1.0, 0.2, shape)
        elif leaf == "shift":
            value = rng.normal(0, vg.STREAM_STD, shape)
        else:
            raise RuntimeError(f"no random value for LIFT tuner parameter {name} {shape}")
        with torch.no_grad():
            p.copy_(torch.from_numpy(np.asarray(value, np.float32)))
    assert all((p != 0).all() for p in tuner.parameters())


def to_unit_range(u8: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1]; the test computes the same float32 expression."""
    return u8.astype(np.float32) / np.float32(127.5) - np.float32(1)


def nchw(u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(to_unit_range(u8)).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def check_every_tuner_tensor_matters(model, x, features) -> None:
    """The golden tolerance (~1e-5) must see a wrong value in any one tuner tensor."""
    for name, p in model.tuner.named_parameters():
        saved = p.detach().clone()
        p.add_(0.1 * torch.sign(torch.randn_like(p)))
        moved = float((model(x, return_feature=True) - features).abs().max())
        p.copy_(saved)
        if moved < 1e-3:
            raise RuntimeError(f"tuner parameter {name} moves the feature by only {moved:.1e}")


# ------------------------------------------------------------------------------------------
# What LIFT's initialisation draws, on large modules.

@torch.no_grad()
def init_statistics(lift) -> dict:
    d, r = INIT_STATS["width"], INIT_STATS["bottleneck"]
    torch.manual_seed(0)
    stats = {}
    for name, cls in (("adaptformer", lift.AdaptFormer), ("adapter", lift.Adapter)):
        m = cls(in_dim=d, bottle_dim=r)
        stats[f"{name}_down_std"] = float(m.down_proj.weight.std())
        stats[f"{name}_down_mean"] = float(m.down_proj.weight.mean())
        stats[f"{name}_zero_at_init"] = float(all(
            bool((t == 0).all()) for t in (m.up_proj.weight, m.up_proj.bias, m.down_proj.bias,
                                           m.ln.bias)))
        stats[f"{name}_ln_eps"] = float(m.ln.eps)
        stats[f"{name}_ln_weight_is_one"] = float(bool((m.ln.weight == 1).all()))
    stats["adaptformer_scale"] = float(lift.AdaptFormer(in_dim=d, bottle_dim=r).scale)
    lora = lift.LoRA(in_dim=d, bottle_dim=r)
    stats["lora_a_absmax"] = float(lora.lora_A.abs().max())
    stats["lora_a_std"] = float(lora.lora_A.std())
    stats["lora_b_zero"] = float(bool((lora.lora_B == 0).all()))
    stats["lora_scaling"] = float(lora.scaling)
    ssf = lift.SSF(64 * d)
    stats["ssf_scale_mean"] = float(ssf.scale.mean())
    stats["ssf_scale_std"] = float(ssf.scale.std())
    stats["ssf_shift_mean"] = float(ssf.shift.mean())
    stats["ssf_shift_std"] = float(ssf.shift.std())
    return {f"init/{k}": np.float64(v) for k, v in stats.items()}


# ------------------------------------------------------------------------------------------
# Test-time ensembling: torchvision's transforms as LIFT's trainer composes them.

def tte_goldens(rng: np.random.Generator) -> tuple[dict, dict]:
    h, w = TTE["image_hw"]
    res, expand = TTE["resolution"], TTE["expand"]
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    pil = Image.fromarray(image)
    resized = transforms.Resize(res + expand)(pil)
    arrays = {"tte/image": image, "tte/resized": np.asarray(resized)}
    for key, crop in (("five_crop", transforms.FiveCrop(res)),
                      ("ten_crop", transforms.TenCrop(res))):
        # LIFT: Compose([Resize(res + expand), FiveCrop(res) / TenCrop(res), ToTensor each, ...])
        crops = transforms.Compose([transforms.Resize(res + expand), crop])(pil)
        arrays[f"tte/{key}"] = np.stack([np.asarray(c) for c in crops])
    meta = dict(TTE, resized_hw=list(arrays["tte/resized"].shape[:2]),
                resize="torchvision Resize(resolution + expand) on a PIL image (bilinear, "
                       "PIL's antialiased resampling)")
    return arrays, meta


# ------------------------------------------------------------------------------------------

def make(lift_repo: Path, rev: str, out: Path) -> dict:
    rng = np.random.default_rng(VIT.seed)
    checkpoint = vg.random_vit_jax_checkpoint(VIT, rng)
    checkpoint = {k: v for k, v in checkpoint.items() if not k.startswith("head/")}
    images_u8 = rng.integers(0, 256, (BATCH, VIT.image_size, VIT.image_size, 3), dtype=np.uint8)
    head_weight = rng.normal(0, 1, (NUM_CLASSES, VIT.width)).astype(np.float32)
    class_counts = np.sort(rng.integers(1, 100, NUM_CLASSES))[::-1].astype(np.int64)
    labels = rng.integers(0, NUM_CLASSES, BATCH).astype(np.int64)
    n_train = sum(TRAIN_BATCHES)
    train_labels = np.concatenate([np.arange(NUM_CLASSES),
                                   rng.integers(0, NUM_CLASSES, n_train - NUM_CLASSES)])
    train_labels = rng.permutation(train_labels).astype(np.int64)
    train_u8 = rng.integers(0, 256, (n_train, VIT.image_size, VIT.image_size, 3),
                            dtype=np.uint8)

    arrays = {f"vit/{k}": v for k, v in checkpoint.items()}
    arrays.update(images_u8=images_u8, head_weight=head_weight, class_counts=class_counts,
                  labels=labels, train_images_u8=train_u8, train_labels=train_labels)
    summary = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lift = import_lift(lift_repo, rev, tmp / "lift")
        ckpt_path = tmp / "vit.npz"
        vg.save_npz_deterministic(ckpt_path, checkpoint)
        x = nchw(images_u8)
        criterion = lift.LogitAdjustedLoss(cls_num_list=torch.Tensor(class_counts))
        torch.manual_seed(0)
        for index, (name, flags) in enumerate(CONFIGS.items()):
            cfg = lift_config(lift, flags)
            model = lift.PeftModelFromViT(cfg, build_timm_backbone(ckpt_path), NUM_CLASSES).eval()
            assert isinstance(model.head, lift.CosineClassifier) and model.head.scale == 25
            randomise_tuner(model.tuner, np.random.default_rng([VIT.seed, index]))
            with torch.no_grad():
                model.head.weight.copy_(torch.from_numpy(head_weight))
                features = model(x, return_feature=True)
                logits = model(x)
                plain = model(x, use_tuner=False, return_feature=True)
                loss = criterion(logits, torch.from_numpy(labels))
            check_every_tuner_tensor_matters(model, x, features)
            for key, value in model.tuner.state_dict().items():
                arrays[f"{name}/tuner/{key}"] = value.numpy().astype(np.float32)
            arrays[f"{name}/features"] = features.numpy().astype(np.float32)
            arrays[f"{name}/logits"] = logits.numpy().astype(np.float32)
            arrays[f"{name}/la_loss"] = np.float32(loss.item())
            summary[name] = dict(tuned_vs_plain=float((features - plain).abs().max()),
                                 la_loss=float(loss))
        # The class-mean head: LIFT's Trainer.init_head_class_mean on the plain backbone.
        model = lift.PeftModelFromViT(lift_config(lift, CONFIGS["adaptformer"]),
                                      build_timm_backbone(ckpt_path), NUM_CLASSES).eval()
        bounds = np.cumsum((0,) + TRAIN_BATCHES)
        loader = [(nchw(train_u8[a:b]), torch.from_numpy(train_labels[a:b]))
                  for a, b in zip(bounds[:-1], bounds[1:])]
        trainer = types.SimpleNamespace(model=model, train_init_loader=loader, device="cpu",
                                        num_classes=NUM_CLASSES, head=model.head)
        lift.init_head_class_mean(trainer)
        arrays["class_mean_head"] = model.head.weight.detach().numpy().astype(np.float32)
        arrays.update(init_statistics(lift))
    tte, tte_meta = tte_goldens(rng)
    arrays.update(tte)

    out.mkdir(parents=True, exist_ok=True)
    save_npz_compressed(out / "lift_goldens.npz", arrays)
    record = dict(
        vit=dict(vg.config_record(VIT), batch=BATCH,
                 checkpoint_layout="vit_jax (AugReg), under 'vit/'"),
        bottleneck=BOTTLENECK, num_classes=NUM_CLASSES, batch=BATCH,
        train_batches=list(TRAIN_BATCHES), cosine_scale=25, la_tau=1.0,
        configs={k: list(v) for k, v in CONFIGS.items()}, tte=tte_meta,
        init_statistics=dict(INIT_STATS, seed="torch.manual_seed(0)"),
        image_input="u8.astype(float32) / float32(127.5) - float32(1), NHWC (NCHW for torch)",
        lift=dict(repository="github.com/shijxcs/LIFT", commit=lift_commit(lift_repo, rev),
                  files=list(LIFT_FILES) + ["trainer.py (Trainer.init_head_class_mean only)"],
                  stubs=list(STUBS)),
        versions=dict(python=platform.python_version(), torch=torch.__version__,
                      timm=vg.timm.__version__, torchvision=torchvision.__version__,
                      pillow=PIL.__version__, numpy=np.__version__,
                      yacs=_version("yacs")))
    (out / "lift_goldens.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return summary


def save_npz_compressed(path: Path, arrays: dict) -> None:
    """`make_vit_goldens.save_npz_deterministic` (fixed timestamps), deflated: the ~300
    small members' headers would otherwise be a third of the file."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            # (np.asarray: np.ascontiguousarray would make the 0-d scalars 1-d)
            np.lib.format.write_array(buf, np.asarray(arrays[key], order="C"), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def _version(dist: str) -> str:
    from importlib.metadata import version
    return version(dist)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lift_repo", type=Path, required=True,
                        help="a LIFT checkout or bare git repository")
    parser.add_argument("--rev", default="HEAD", help="the LIFT revision to read")
    parser.add_argument("--out", type=Path, default=Path("tests/data"), help="output folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # deterministic float32 sums on every machine
    summary = make(args.lift_repo, args.rev, args.out)
    for name, s in summary.items():
        print(name, s)
    print("wrote", args.out / "lift_goldens.npz",
          f"({(args.out / 'lift_goldens.npz').stat().st_size} bytes)")


if __name__ == "__main__":
    main()
