"""Where the shipped step's time goes on this machine: XLA's ops grouped by what they compute.

    .venv/bin/python benchmarks/profile_step.py [--case phase2_step|phase1_step|phase2_inference]
        [--size B/16] [--batch 8] [--calls 2] [--top 25]

Compiles the shipped function (benchmarks/shipped.py), runs it under `jax.profiler` and sums
the traced duration of every XLA op (thunk) by the layer it came from (the op's source name,
block numbers dropped: `MlpBlock_0/Dense_0/dot_general` collects all blocks' first MLP
matmul). The two XLA CPU threads can run ops at the same time, so the shares are of summed op
time, not of wall time. Prints a table; writes nothing. Never touches the network.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import jax  # noqa: E402

import shipped  # noqa: E402


def op_sources(hlo_text: str) -> dict:
    """HLO instruction name -> a short source name (last 3 parts, block numbers dropped)."""
    out = {}
    for m in re.finditer(r"%([\w.\-]+) = [^\n]*?metadata=\{op_name=\"([^\"]+)\"", hlo_text):
        name = re.sub(r"encoderblock_\d+", "block", m.group(2))
        out[m.group(1)] = "/".join(name.split("/")[-3:])
    return out


def op_times(trace_dir: str, calls: int) -> dict:
    """Summed duration (ms per call) of each XLA op in the trace, by instruction name."""
    path = sorted(glob.glob(f"{trace_dir}/plugins/profile/*/*.trace.json.gz"))[-1]
    events = json.load(gzip.open(path))["traceEvents"]
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    times = collections.defaultdict(float)
    for e in events:
        if e.get("ph") != "X" or not threads.get((e["pid"], e["tid"]), "").startswith("tf_XLA"):
            continue
        if e["name"].startswith(("ThunkExecutor", "end:", "Slinky")):
            continue
        times[e["name"]] += e["dur"] / 1e3 / calls
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", default="phase2_step",
                    choices=("phase1_step", "phase2_step", "phase2_inference"))
    ap.add_argument("--size", default="B/16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)

    config = shipped.bench_config(args.size, batch=args.batch)
    model, params = shipped.build(config)
    mesh = shipped.make_mesh()
    if args.case == "phase2_inference":
        prepared = shipped.prepare_predict(model, shipped.SHARED_TRUNK, params, batch=args.batch,
                                           image_size=config.data.image_size, mesh=mesh)
    else:
        phase = shipped.PHASE1 if args.case == "phase1_step" else shipped.SHARED_TRUNK
        prepared = shipped.prepare_step(model, phase, config, params, batch=args.batch, mesh=mesh)
    prepared.call()
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        wall = sum(prepared.call()[0] for _ in range(args.calls)) / args.calls
        jax.profiler.stop_trace()
        times = op_times(trace_dir, args.calls)
    sources = op_sources(prepared.compiled.as_text())
    by_source = collections.defaultdict(float)
    for op, ms in times.items():
        kind = "matmul" if op.startswith(("ynn_fusion", "dot")) else "other"
        by_source[(sources.get(op, op), kind)] += ms
    total = sum(by_source.values())
    print(f"{args.case}, {args.size}, batch {args.batch}: {wall * 1e3:.0f} ms wall per call, "
          f"{total:.0f} ms of summed op time; XLA {prepared.footprint['xla_flops'] / 1e9:.0f} "
          "GFLOP")
    print(f"{'ms/call':>8} {'share':>6}  {'kernel':7} source")
    for (source, kind), ms in sorted(by_source.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{ms:8.1f} {100 * ms / total:5.1f}%  {kind:7} {source}")
    matmul = sum(ms for (_, kind), ms in by_source.items() if kind == "matmul")
    print(f"matmul kernels (YNNPACK / XLA dot): {100 * matmul / total:.1f}% of op time")


if __name__ == "__main__":
    main()
