"""python -m lpt_jax.convert release|backbone ... (see docs/convert.md)

  release   the PyTorch LPT release's checkpoint (LPT_places.pth) -> DIR/backbone.npz
            (big_vision layout) + DIR/export.npz (phase-2 export for run.py --mode=eval)
  backbone  a timm / Hugging Face ViT state dict (.safetensors, .pth, .pt, .bin) -> a
            big_vision .npz

A problem ends the command with one `error:` line before anything is written: exit 2 for the
command line, 1 for the checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m lpt_jax.convert", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    rel = sub.add_parser("release", help="the PyTorch LPT release -> backbone.npz + export.npz")
    rel.add_argument("--checkpoint", required=True, help="the release's .pth (local or gs://)")
    rel.add_argument("--out", required=True, help="folder for backbone.npz and export.npz")
    rel.add_argument("--class_names", default="places_lt",
                     help="places_lt (default) or imagenet_lt (the shipped lists), a file with "
                          "one name per line, or none")
    rel.add_argument("--top_k", type=int, default=2, help="pool entries per image (release: 2)")
    bb = sub.add_parser("backbone", help="a timm / Hugging Face ViT -> big_vision .npz")
    bb.add_argument("--checkpoint", required=True, help=".safetensors, .pth, .pt or .bin")
    bb.add_argument("--out", required=True, help="the .npz to write")
    for p in (rel, bb):
        p.add_argument("--num_heads", type=int, default=None,
                       help="attention heads; default from the width (192: 3, 384: 6, 768: 12, "
                            "1024: 16, 1280: 16), required for other widths")
        p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return ap


def _release(args) -> None:
    from lpt_jax.convert import convert_release
    done = convert_release(args.checkpoint, args.out, num_heads=args.num_heads,
                           top_k=args.top_k, class_names=args.class_names,
                           overwrite=args.overwrite)
    s = done["shapes"]
    print(f"read {args.checkpoint}: ViT {s['width']} wide, {s['depth']} blocks, "
          f"{s['num_heads']} heads, patch {s['patch_size']}, {s['image_size']} px; prompts "
          f"{s['prompt_length']} tokens, pool {s['pool_size']} x {s['depth'] - s['shared_depth']}"
          f" blocks from block {s['shared_depth']}, top-{s['top_k']}; {s['num_classes']} classes"
          f" (names: {done['class_names']})")
    print(f"wrote {done['backbone']}\nwrote {done['export']}")
    extra = " ".join(f"--config.{k}={v}" for k, v in done["eval_settings"].items())
    print("evaluate with:\n  python run.py --config=configs/places_lt.py --mode=eval "
          f"--workdir=<dir> --export={done['export']} "
          f"--config.backbone.checkpoint={done['backbone']} --config.data.root=<images>"
          + (f" {extra}" if extra else ""))


def _backbone(args) -> None:
    from lpt_jax.convert import convert_backbone
    done = convert_backbone(args.checkpoint, args.out, num_heads=args.num_heads,
                            overwrite=args.overwrite)
    s = done["shapes"]
    print(f"wrote {done['out']}: ViT {s['width']} wide, {s['depth']} blocks, {s['num_heads']} "
          f"heads, MLP {s['mlp_dim']}, patch {s['patch_size']}, {s['image_size']} px, pool "
          f"{s['pool_type']}, head {s['num_classes']}")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from lpt_jax.errors import CheckpointError
    try:
        (_release if args.command == "release" else _backbone)(args)
    except CheckpointError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        print(f"error: cannot write or read{where}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
