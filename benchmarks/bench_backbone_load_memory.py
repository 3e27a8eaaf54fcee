"""Peak host memory of `lpt_jax.vit_weights.load_params` on a ViT-B/16-sized checkpoint (issue 2).

Writes random ViT-B/16 checkpoints (21843-way head, ~391 MiB in float32) to a temporary
folder in three layouts (vit_jax/AugReg, big_vision, big_vision scan), then measures each
case in FRESH subprocesses, so nothing from an earlier case is left in the heap:

    baseline = RSS after importing jax, building the abstract param tree (jax.eval_shape)
               and, for the remote-like cases, copying the file into TF's `ram://` filesystem;
    peak     = the RSS high-water mark during `load_params(path, abstract, ignore=['head/.*'])`;
    ratio    = (peak - baseline) / file size.

The high-water mark (VmHWM, which is also what `resource.getrusage().ru_maxrss` reports) is
reset right before the call (`echo 5 > /proc/self/clear_refs`), so earlier peaks (imports,
the ram:// copy) cannot hide the load. A second process per case resets it again after each
stage of the load (read_arrays, to_big_vision_layout, matching) to show where memory goes.

    .venv/bin/python benchmarks/bench_backbone_load_memory.py            # all cases, ~2 min
    .venv/bin/python benchmarks/bench_backbone_load_memory.py --cases augreg ram_augreg

Results go to benchmarks/results/backbone_load_memory.md (`--results ''` to skip); a
hand-written '## Analysis' section in that file is kept on reruns. The temporary checkpoints
are deleted afterwards. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import host  # noqa: E402
from host import hwm_bytes, reset_hwm, rss_bytes  # noqa: E402

MiB = 2 ** 20
HEAD_CLASSES = 21843
NOTES_HEADING = "## Analysis"

# case -> (checkpoint layout, through TF's ram:// filesystem, read_arrays variant, device_put)
CASES = {
    "augreg": ("augreg", False, "current", False),
    "big_vision": ("big_vision", False, "current", False),
    "big_vision_scan": ("big_vision_scan", False, "current", False),
    "ram_augreg": ("augreg", True, "current", False),
    "ram_augreg_streamed": ("augreg", True, "streamed", False),
    "augreg_device_put": ("augreg", False, "current", True),
}


# ------------------------------------------------------------------------------------------
# Memory counters (Linux).

def ru_maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def release_free_heap() -> None:
    """Returns freed heap pages to the OS so the baseline RSS holds no reusable slack."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


# ------------------------------------------------------------------------------------------
# Writing random checkpoints (parent process).

def vit_b16(num_classes=None):
    from lpt_jax.backbones.vit import ViT, decode_variant
    return ViT(num_classes=num_classes, image_size=(224, 224), layernorm_epsilon=1e-5,
               **decode_variant("B/16"))


def abstract_params(model):
    import jax
    import jax.numpy as jnp
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    return shapes["params"]


_AUGREG_BLOCK_NAMES = {"MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
                       "LayerNorm_1": "LayerNorm_2", "MlpBlock_0": "MlpBlock_3"}


def checkpoint_shapes(layout: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a ViT-B/16 checkpoint with a 21843-way head in `layout`."""
    from lpt_jax.tree import flatten
    flat = {k: tuple(v.shape) for k, v in flatten(abstract_params(vit_b16(HEAD_CLASSES))).items()}
    if layout == "big_vision":
        return flat
    if layout == "big_vision_scan":  # blocks stacked on a leading depth axis
        prefix, out, depth = "Transformer/encoderblock_", {}, 0
        for k, shape in flat.items():
            if k.startswith(prefix):
                idx, rest = k[len(prefix):].split("/", 1)
                depth = max(depth, int(idx) + 1)
                out[f"Transformer/encoderblock/{rest}"] = shape
            else:
                out[k] = shape
        return {k: ((depth,) + s if k.startswith("Transformer/encoderblock/") else s)
                for k, s in out.items()}
    if layout == "augreg":  # vit_jax names; position table with the CLS row first
        out = {}
        for k, shape in flat.items():
            if k == "pos_embedding":
                out["Transformer/posembed_input/pos_embedding"] = (1, shape[1] + 1, shape[2])
            else:
                out["/".join(_AUGREG_BLOCK_NAMES.get(p, p) for p in k.split("/"))] = shape
        return out
    raise ValueError(f"unknown layout {layout!r}")


def write_random_checkpoint(path: Path, layout: str, seed: int = 0) -> int:
    """Writes an uncompressed .npz (what np.savez writes) array by array; returns its size."""
    import numpy as np
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, shape in checkpoint_shapes(layout).items():
            a = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
            with zf.open(name + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, a, allow_pickle=False)
    return path.stat().st_size


# ------------------------------------------------------------------------------------------
# The proposed remote read (issue 2): hand the TF file object to np.load instead of reading
# the whole file into a bytes object first. Measured here as `ram_augreg_streamed` until
# `lpt_jax.vit_weights.read_arrays` adopts it.

def streamed_read_arrays(path: str):
    import numpy as np

    from lpt_jax.storage import files
    from lpt_jax.weights.npz import fix_dtype
    with files.open_read(path) as f, np.load(f, allow_pickle=False) as loaded:
        return {k: fix_dtype(loaded[k]) for k in loaded.files}


# ------------------------------------------------------------------------------------------
# One measurement (child process).

class StageMeter:
    """Peak and retained RSS above a baseline per stage; resets the high-water mark each time."""

    def __init__(self, baseline: int):
        self.baseline = baseline
        self.stages = []

    def mark(self, name: str) -> None:
        self.stages.append(dict(stage=name, peak_extra=hwm_bytes() - self.baseline,
                                rss_extra_after=rss_bytes() - self.baseline))
        reset_hwm()


def _wrap_stages(meter: StageMeter) -> None:
    """Marks the end of each stage of load_params by wrapping the functions it calls."""
    from lpt_jax.backbones import vit_weights

    def wrap(fn, name):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            meter.mark(name)
            return out
        return wrapped

    vit_weights.read_arrays = wrap(vit_weights.read_arrays, "read_arrays")
    vit_weights.to_big_vision_layout = wrap(vit_weights.to_big_vision_layout, "to_big_vision_layout")


def measure(case: str, path: str, stages: bool) -> dict:
    import jax

    from lpt_jax.backbones import vit_weights

    _, ram, reader, device_put = CASES[case]
    size = os.path.getsize(path)
    abstract = abstract_params(vit_b16())
    if ram:  # a remote-like path; the ram:// copy itself is part of the baseline
        import tensorflow as tf
        tf.config.set_visible_devices([], "GPU")
        remote = "ram://bench/" + os.path.basename(path)
        tf.io.gfile.copy(path, remote, overwrite=True)
        path = remote
    if reader == "streamed":
        vit_weights.read_arrays = streamed_read_arrays
    release_free_heap()

    ru_lifetime_before = ru_maxrss_bytes()
    baseline = rss_bytes()
    meter = StageMeter(baseline)
    if stages:
        _wrap_stages(meter)
    reset_hwm()
    t0 = time.perf_counter()
    params = vit_weights.load_params(path, abstract, ignore=["head/.*"])
    if device_put:
        if stages:
            meter.mark("load_params")
        params = jax.block_until_ready(jax.device_put(params))
    seconds = time.perf_counter() - t0
    peak_extra, ru_extra = hwm_bytes() - baseline, ru_maxrss_bytes() - baseline
    meter.mark("device_put" if device_put else "match_and_unflatten")
    return dict(
        file_bytes=size, param_bytes=sum(x.nbytes for x in jax.tree.leaves(params)),
        baseline_rss=baseline, peak_extra=peak_extra, ru_maxrss_extra=ru_extra,
        ru_maxrss_lifetime_before_extra=ru_lifetime_before - baseline,
        retained_extra=rss_bytes() - baseline, seconds=seconds, stages=meter.stages)


# ------------------------------------------------------------------------------------------
# Driver.

def _child(case: str, ckpt: Path, stages: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", str(ckpt), "--child-case", case]
    if stages:
        cmd.append("--child-stages")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_case(case: str, ckpt: Path) -> dict:
    """Whole-call numbers from one fresh process, the per-stage split from another."""
    result = _child(case, ckpt, stages=False)
    result["ratio"] = result["peak_extra"] / result["file_bytes"]
    result["stages"] = _child(case, ckpt, stages=True)["stages"]
    layout, ram, reader, device_put = CASES[case]
    result.update(case=case, layout=layout, ram=ram, reader=reader, device_put=device_put)
    return result


def machine_info() -> dict:
    import jax
    return dict(host.describe(), jax=jax.__version__)


def format_results(results: list[dict], info: dict) -> str:
    lines = [
        "# Host memory of loading a ViT-B/16 checkpoint (`lpt_jax.vit_weights.load_params`)",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB RAM, Linux "
        f"{info['kernel']}; Python {info['python']}, numpy {info['numpy']}, jax {info['jax']}. "
        f"Date: {info['date']}.",
        "Script: `benchmarks/bench_backbone_load_memory.py` (fresh processes per case, random "
        "float32 weights, 21843-way head dropped by `ignore=['head/.*']`, abstract "
        "`jax.eval_shape` tree as `init_params`).",
        "",
        "peak extra = RSS high-water mark during the call (reset right before it) minus the RSS "
        "right before it; ratio = peak extra / file size; ru_maxrss extra = the same read "
        "through `getrusage` (same kernel counter); retained = RSS after the call minus the "
        "baseline (the returned params, plus freed heap not yet given back to the OS).",
        "",
        "| case | layout | path | file MiB | params MiB | peak extra MiB | ratio | "
        "ru_maxrss extra MiB | retained MiB | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        where = "ram://" if r["ram"] else "local"
        if r["reader"] != "current":
            where += f" ({r['reader']}, proposed)"
        if r["device_put"]:
            where += " + jax.device_put"
        lines.append(
            f"| {r['case']} | {r['layout']} | {where} | {r['file_bytes'] / MiB:.0f} | "
            f"{r['param_bytes'] / MiB:.0f} | {r['peak_extra'] / MiB:.0f} | **{r['ratio']:.2f}** | "
            f"{r['ru_maxrss_extra'] / MiB:.0f} | {r['retained_extra'] / MiB:.0f} | "
            f"{r['seconds']:.1f} |")
    lines += ["", "Per stage, from a separate process with the high-water mark reset after each "
              "stage (peak extra / RSS extra at the end of the stage, MiB above the baseline):",
              "", "| case | stage 1 | stage 2 | stage 3 | stage 4 |", "|---|---|---|---|---|"]
    for r in results:
        cells = [f"{s['stage']}: {s['peak_extra'] / MiB:.0f} / {s['rss_extra_after'] / MiB:.0f}"
                 for s in r["stages"]]
        lines.append(f"| {r['case']} | " + " | ".join(cells + [""] * (4 - len(cells))) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--results", default=str(REPO / "benchmarks/results/backbone_load_memory.md"),
                    help="markdown file to (over)write; '' to only print")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-case", help=argparse.SUPPRESS)
    ap.add_argument("--child-stages", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        print(json.dumps(measure(args.child_case, args.child, args.child_stages)))
        return

    tmp = Path(tempfile.mkdtemp(prefix="bench_load_mem_"))
    results = []
    try:
        written = {}
        for case in args.cases:
            layout = CASES[case][0]
            if layout not in written:
                t = time.perf_counter()
                written[layout] = tmp / f"vit_b16_{layout}.npz"
                size = write_random_checkpoint(written[layout], layout)
                print(f"wrote {layout}: {size / MiB:.0f} MiB in {time.perf_counter() - t:.1f} s",
                      flush=True)
            r = run_case(case, written[layout])
            results.append(r)
            print(f"{case:20s} peak extra {r['peak_extra'] / MiB:5.0f} MiB  ratio {r['ratio']:.2f}"
                  f"  retained {r['retained_extra'] / MiB:5.0f} MiB  {r['seconds']:.1f} s  | "
                  + "  ".join(f"{s['stage']}={s['peak_extra'] / MiB:.0f}" for s in r["stages"]),
                  flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    text = format_results(results, machine_info())
    print(text)
    if args.results:
        out = Path(args.results)
        out.parent.mkdir(parents=True, exist_ok=True)
        old = out.read_text() if out.exists() else ""
        if NOTES_HEADING in old:  # keep the hand-written analysis
            text += "\n" + old[old.index(NOTES_HEADING):]
        out.write_text(text)


if __name__ == "__main__":
    main()
