"""LPT's benchmarks, one harness over the shipped functions (README.md has the cases).

    python benchmarks/bench.py --list
    python benchmarks/bench.py CASE [--help] [options] [--results DIR]
"""

import importlib.util
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# LPT_BENCH_REPO: a fresh process timing another checkout (vs_pytorch --baseline-repo) takes
# that checkout's lpt_jax, configs and benchmarks/shipped.py; everything else stays ours.
REPO = os.environ.get("LPT_BENCH_REPO") or str(HERE.parent)
sys.path[:0] = [REPO, str(HERE)]
if os.environ.get("LPT_BENCH_REPO"):
    spec = importlib.util.spec_from_file_location("shipped", f"{REPO}/benchmarks/shipped.py")
    sys.modules["shipped"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["shipped"])

import harness  # noqa: E402

for module in ("compute", "gpu", "memory", "inputs"):  # they register their cases
    __import__(module)

if __name__ == "__main__":
    harness.main()
