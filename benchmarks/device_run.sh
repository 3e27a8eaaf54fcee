#!/usr/bin/env bash
# The one command for a lent GPU machine (one H100 / H200, 16 host cores, no network, python3 with
# jax[cuda], flax, optax, numpy, pillow, opencv; no ml-collections, no TensorFlow):
#   run(command="bash benchmarks/device_run.sh", carry=[".device_wheels"], timeout_s=580)
# .device_wheels/ (git-ignored), made once: .venv/bin/pip download ml-collections --no-deps -d .device_wheels
# 1. installs the carried wheels when ml_collections is missing; 2. prints nvidia-smi, versions,
# jax.devices(); 3. `bench.py gpu` under a timeout (SIGINT, then SIGKILL; it rewrites its results
# after every case); 4. if time allows, `bench.py proxy` against step 3's fastest train step.
# Results in $OUT (the results/ files are copied in first, so they come back with their history:
# copy them over benchmarks/results/) and $OUT/device_run.log. Worst case ~10+440+20+75 < 580 s.
# CPU smoke test: OUT=/tmp/devout PYTHON=.venv/bin/python GPU_BENCH_ARGS=--quick \
#   GPU_BENCH_TIMEOUT=1500 TOTAL_BUDGET_S=1700 bash benchmarks/device_run.sh
# Knobs: OUT, PYTHON, GPU_BENCH_ARGS, GPU_BENCH_TIMEOUT (440), INPUT_PROXY_SECONDS (6),
# INPUT_PROXY_TIMEOUT (75), TOTAL_BUDGET_S (545: the proxy starts only if it ends by then),
# SKIP_INPUT_PROXY=1.

set -u
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
case " ${GPU_BENCH_ARGS:-} " in *" --quick "*) GPU_STEM=gpu_quick ;; *) GPU_STEM=gpu_h100 ;; esac

main() {
    echo "== device_run.sh $(date -u '+%Y-%m-%d %H:%M:%S') UTC, OUT=$OUT, python $PY"
    echo "== 1. packages"
    if ! "$PY" -c "import ml_collections" 2>/dev/null; then
        if ls .device_wheels/*.whl >/dev/null 2>&1; then
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target /tmp/lpt_site .device_wheels/*.whl \
                && export PYTHONPATH=/tmp/lpt_site${PYTHONPATH:+:$PYTHONPATH}
        else
            echo "ml_collections is missing and no .device_wheels/*.whl was carried"
        fi
    fi
    echo "== 2. machine"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi
        nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,power.limit \
            --format=csv
    fi
    echo "host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), $(nproc) cores"
    "$PY" -c "import importlib, platform; print('python', platform.python_version())
for m in ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'ml_collections', 'cv2', 'PIL'):
    try: print(m, getattr(importlib.import_module(m), '__version__', '?'))
    except Exception as e: print(m, 'not importable:', type(e).__name__)
import jax; print('jax.devices():', jax.devices(), 'backend:', jax.default_backend())"
    for f in benchmarks/results/$GPU_STEM.* benchmarks/results/input_proxy.*; do
        [ -e "$f" ] && [ ! -e "$OUT/$(basename "$f")" ] && cp "$f" "$OUT/"
    done

    echo "== 3. bench.py gpu (timeout ${GPU_BENCH_TIMEOUT:-440} s) $(date -u +%T)"
    # shellcheck disable=SC2086  # GPU_BENCH_ARGS is a list of arguments
    timeout -k 20 -s INT "${GPU_BENCH_TIMEOUT:-440}" "$PY" benchmarks/bench.py gpu \
        --results "$OUT" ${GPU_BENCH_ARGS:-}
    echo "bench.py gpu exit status $? after ${SECONDS} s of this script"

    echo "== 4. input pipeline proxy (TF-free) $(date -u +%T)"
    if [ "${SKIP_INPUT_PROXY:-0}" = 1 ]; then
        echo "skipped: SKIP_INPUT_PROXY=1"
    elif [ $((SECONDS + ${INPUT_PROXY_TIMEOUT:-75})) -gt "${TOTAL_BUDGET_S:-545}" ]; then
        echo "skipped: ${SECONDS} s spent + ${INPUT_PROXY_TIMEOUT:-75} s > ${TOTAL_BUDGET_S:-545} s"
    else
        timeout -k 5 "${INPUT_PROXY_TIMEOUT:-75}" "$PY" benchmarks/bench.py proxy \
            --seconds "${INPUT_PROXY_SECONDS:-6}" --gpu-json "$OUT/$GPU_STEM.json" --results "$OUT"
        echo "input proxy exit status $?"
    fi
    echo "== done after ${SECONDS} s; files in $OUT:"
    ls -la "$OUT"
}

main 2>&1 | tee "$OUT/device_run.log"
