"""Time and peak host memory of converting a ViT-B/16-sized LPT release checkpoint (issue 12).

1. The oracle venv (torch) writes a random release file in the release's format to a temporary
   folder: `{'config', 'state_dict' (module.-prefixed), 'val_acc'}` with ViT-B/16's timm names,
   prompts (12, 10, 768), pool (20, 6, 10, 768), keys (20, 768), head (768, 365): ~333 MiB.
   (`python benchmarks/convert_memory.py --write-release PATH` is that step on its own; it
   imports torch only, never lpt_jax.)
2. Each case runs in a FRESH main-venv process: baseline = RSS after importing jax and
   lpt_jax.convert; the RSS high-water mark (VmHWM) is reset right before the call
   (`echo 5 > /proc/self/clear_refs`), so peak extra = HWM - baseline is the call's own.

Cases:
  convert_release   `lpt_jax.convert.convert_release` (what `python -m lpt_jax.convert release`
                    runs): read + check + write DIR/backbone.npz and DIR/export.npz;
  convert_release_warm  the same after JAX has traced the model once (jax.eval_shape of its
                    init, before the baseline): the part of the peak that is JAX's one-time
                    tracing, not the file;
  load_release      `lpt_jax.convert.load_release`: (model, params) in memory;
  backbone_npz      `lpt_jax.vit_weights.load_params` of the converted backbone.npz (the loader
                    eval uses), for comparison with issue 2's 1.00x.

    .venv/bin/python benchmarks/convert_memory.py [--oracle-python /work/oracle_venv/bin/python]

Results: benchmarks/results/convert.md (a hand-written '## Analysis' section is kept on
reruns). Temporary files are deleted. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import host  # noqa: E402

MiB = 2 ** 20
NOTES_HEADING = "## Analysis"
CASES = ("convert_release", "convert_release_warm", "load_release", "backbone_npz")
B16 = dict(width=768, depth=12, mlp=3072, patch=16, grid=14, prompt=10, pool=20, pool_depth=6,
           classes=365)


# ------------------------------------------------------------------------------------------
# Step 1, in the oracle venv: the release file (torch only).

def write_release(path: str) -> None:
    import torch
    g = torch.Generator().manual_seed(0)
    c = B16
    d, m = c["width"], c["mlp"]

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    state = {"cls_token": rand(1, 1, d), "pos_embed": rand(1, 1 + c["grid"] ** 2, d),
             "patch_embed.proj.weight": rand(d, 3, c["patch"], c["patch"]),
             "patch_embed.proj.bias": rand(d), "norm.weight": rand(d), "norm.bias": rand(d)}
    for i in range(c["depth"]):
        b = f"blocks.{i}."
        state.update({b + "norm1.weight": rand(d), b + "norm1.bias": rand(d),
                      b + "attn.qkv.weight": rand(3 * d, d), b + "attn.qkv.bias": rand(3 * d),
                      b + "attn.proj.weight": rand(d, d), b + "attn.proj.bias": rand(d),
                      b + "norm2.weight": rand(d), b + "norm2.bias": rand(d),
                      b + "mlp.fc1.weight": rand(m, d), b + "mlp.fc1.bias": rand(m),
                      b + "mlp.fc2.weight": rand(d, m), b + "mlp.fc2.bias": rand(d)})
    state.update({
        "prompt_learner.Prompt_Tokens": rand(c["depth"], c["prompt"], d),
        "prompt_learner.Prompt_Tokens_pool": rand(c["pool"], c["pool_depth"], c["prompt"], d),
        "prompt_learner.Prompt_Keys": rand(c["pool"], d),
        "prompt_learner.head.weight": rand(d, c["classes"])})
    torch.save({"config": {"base_model": "vit_base_patch16_224_in21k"},
                "state_dict": {f"module.{k}": v for k, v in state.items()}, "val_acc": 0.5},
               path)


# ------------------------------------------------------------------------------------------
# Step 2, in fresh main-venv processes.

def measure(case: str, path: str, workdir: str) -> dict:
    import ctypes
    import gc

    import jax
    import ml_collections

    from lpt_jax import convert
    from lpt_jax.backbones import vit_weights
    from lpt_jax.convert.fit import abstract_params
    from lpt_jax.method.lpt_model import lpt_from_config
    from lpt_jax.run import exports
    abstract = None
    if case == "convert_release_warm":  # JAX's one-time tracing out of the measured call
        release = convert.read_release(path)
        abstract_params(convert.release.build_model(release))
        del release
    if case == "backbone_npz":  # the model that the converted export describes
        _, meta = exports.read(os.path.join(workdir, "export.npz"))
        model = lpt_from_config(ml_collections.ConfigDict(meta["config"]["model"]),
                                meta["num_classes"])
        abstract = abstract_params(model)["backbone"]
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    baseline = host.rss_bytes()
    host.reset_hwm()
    cpu0, t0 = time.process_time(), time.perf_counter()
    if case.startswith("convert_release"):
        convert.convert_release(path, workdir, overwrite=True)
        result = None
    elif case == "load_release":
        result = convert.load_release(path)
    else:
        result = vit_weights.load_params(os.path.join(workdir, "backbone.npz"), abstract)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    peak = host.hwm_bytes() - baseline
    out = dict(case=case, seconds=seconds, cpu_seconds=cpu, peak_extra=peak,
               retained_extra=host.rss_bytes() - baseline,
               file_bytes=os.path.getsize(path), jax=jax.__version__)
    if case.startswith("convert_release"):
        out["outputs"] = {n: os.path.getsize(os.path.join(workdir, n))
                          for n in ("backbone.npz", "export.npz")}
    del result
    return out


def _child(case: str, path: Path, workdir: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", case, str(path), str(workdir)],
                          capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise RuntimeError(f"{case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_results(results: list[dict], info: dict, write_seconds: float) -> str:
    jax_version = results[0]["jax"]
    lines = [
        "# Converting a ViT-B/16-sized LPT release checkpoint (`lpt_jax.convert`)", "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB RAM, Linux "
        f"{info['kernel']}; Python {info['python']}, numpy {info['numpy']}, jax {jax_version}; "
        f"load average {info['load']:.1f} at the start. Date: {info['date']}.",
        "Script: `benchmarks/convert_memory.py` (random weights in the release's format, "
        f"written by torch in the oracle venv in {write_seconds:.0f} s; one fresh process per "
        "case).", "",
        "peak extra = RSS high-water mark during the call (reset right before it) minus the "
        "RSS before it (jax and lpt_jax.convert imported); ratio = peak extra / size of the "
        ".pth; retained = RSS after the call minus that baseline.", "",
        "| case | .pth MiB | wall s | CPU s | peak extra MiB | ratio | retained MiB | outputs |",
        "|---|---|---|---|---|---|---|---|"]
    for r in results:
        outputs = ", ".join(f"{k} {v / MiB:.1f} MiB" for k, v in r.get("outputs", {}).items())
        lines.append(
            f"| {r['case']} | {r['file_bytes'] / MiB:.0f} | {r['seconds']:.1f} | "
            f"{r['cpu_seconds']:.1f} | {r['peak_extra'] / MiB:.0f} | "
            f"**{r['peak_extra'] / r['file_bytes']:.2f}** | {r['retained_extra'] / MiB:.0f} | "
            f"{outputs} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--oracle-python", default="/work/oracle_venv/bin/python",
                    help="python of a venv with torch (writes the release file)")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--results", default=str(REPO / "benchmarks/results/convert.md"),
                    help="markdown file to (over)write; '' to only print")
    ap.add_argument("--write-release", metavar="PATH", help=argparse.SUPPRESS)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.write_release:
        write_release(args.write_release)
        return
    if args.child:
        sys.path.insert(0, str(REPO))
        print(json.dumps(measure(*args.child)))
        return

    tmp = Path(tempfile.mkdtemp(prefix="bench_convert_"))
    try:
        path = tmp / "LPT_random_b16.pth"
        t = time.perf_counter()
        subprocess.run([args.oracle_python, __file__, "--write-release", str(path)], check=True)
        write_seconds = time.perf_counter() - t
        print(f"wrote {path.stat().st_size / MiB:.0f} MiB in {write_seconds:.0f} s", flush=True)
        results = []
        for case in args.cases:
            r = _child(case, path, tmp / "out")
            results.append(r)
            print(f"{case:16s} {r['seconds']:5.1f} s  peak extra {r['peak_extra'] / MiB:4.0f} MiB"
                  f"  ratio {r['peak_extra'] / r['file_bytes']:.2f}", flush=True)
        info = host.describe()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = format_results(results, info, write_seconds)
    print(text)
    if args.results:
        out = Path(args.results)
        old = out.read_text() if out.exists() else ""
        if NOTES_HEADING in old:
            text += "\n" + old[old.index(NOTES_HEADING):]
        out.write_text(text)


if __name__ == "__main__":
    main()
