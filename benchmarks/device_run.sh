#!/usr/bin/env bash
# The one command for the lent GPU machine (issue 15): one NVIDIA H200 (or H100), 16 host
# cores, no network, python3 with jax[cuda] / flax / optax / numpy / pillow / opencv but no
# ml-collections (carried as a wheel) and no TensorFlow. The exact device-tool call:
#
#   run(command="bash benchmarks/device_run.sh", carry=[".device_wheels"], timeout_s=580)
#
# .device_wheels/ (git-ignored) is made here, once, from the repository root:
#   .venv/bin/pip download ml-collections --no-deps -d .device_wheels
#
# What it does, everything logged to $OUT/device_run.log (results come back only from $OUT):
#  1. installs the carried wheels into /tmp/lpt_site when ml_collections is not importable;
#  2. prints nvidia-smi, the host CPU, python / jax / jaxlib / flax / optax versions and
#     jax.devices();
#  3. runs benchmarks/gpu_h100.py under a timeout (SIGINT, then SIGKILL 20 s later; the script
#     rewrites $OUT/gpu_h100.json and $OUT/gpu_h100.md after every case, so a cut run keeps
#     what it measured);
#  4. if the time allows, a TF-free proxy for the tf.data input pipeline: JPEG decode +
#     RandomResizedCrop + flip + resize to 224 px with OpenCV (and PIL) over a process pool
#     on all host cores, from the committed demo JPEGs (demo/cifar10_lt6, 32x32 CIFAR images
#     re-encoded at 256x256 and 500x375, quality 90, as benchmarks/bench_input_pipeline.py
#     does), against the fastest train step's consumption from step 3
#     -> $OUT/input_proxy.json, $OUT/input_proxy.md.
# Worst case ~10 s + GPU_BENCH_TIMEOUT (440) + 20 + INPUT_PROXY_TIMEOUT (75) < 580 s.
#
# Smoke test on a CPU machine (tiny models, minutes):
#   OUT=/tmp/devout PYTHON=.venv/bin/python GPU_BENCH_ARGS=--quick GPU_BENCH_TIMEOUT=1500 \
#     TOTAL_BUDGET_S=1700 bash benchmarks/device_run.sh
# Knobs (environment): OUT, PYTHON (python3), GPU_BENCH_ARGS (extra gpu_h100.py arguments,
# e.g. "--cases p1,p2,p2ref"), GPU_BENCH_TIMEOUT (440 s), INPUT_PROXY_SECONDS (6 s per
# measurement), INPUT_PROXY_TIMEOUT (75 s), TOTAL_BUDGET_S (545: the proxy starts only if it
# can end by then), SKIP_INPUT_PROXY=1.

set -u
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
GPU_BENCH_TIMEOUT=${GPU_BENCH_TIMEOUT:-440}
INPUT_PROXY_SECONDS=${INPUT_PROXY_SECONDS:-6}
INPUT_PROXY_TIMEOUT=${INPUT_PROXY_TIMEOUT:-75}
TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-545}
export PYTHONUNBUFFERED=1

PROXY=benchmarks/input_proxy.py

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
    "$PY" -c "import ml_collections; print('ml_collections', ml_collections.__file__)" \
        || echo "WARNING: ml_collections not importable: gpu_h100.py will fail"

    echo "== 2. machine"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi
        nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,power.limit \
            --format=csv
    else
        echo "no nvidia-smi"
    fi
    echo "host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), $(nproc) cores"
    "$PY" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("jax", "jaxlib", "flax", "optax", "numpy", "ml_collections", "cv2", "PIL"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as err:
        print(name, "not importable:", type(err).__name__)
import jax
print("jax.devices():", jax.devices(), "backend:", jax.default_backend())
EOF

    echo "== 3. benchmarks/gpu_h100.py (timeout ${GPU_BENCH_TIMEOUT} s) $(date -u +%T)"
    # shellcheck disable=SC2086  # GPU_BENCH_ARGS is a list of arguments
    timeout -k 20 -s INT "$GPU_BENCH_TIMEOUT" "$PY" benchmarks/gpu_h100.py \
        --out "$OUT/gpu_h100.json" ${GPU_BENCH_ARGS:-}
    echo "gpu_h100.py exit status $? after ${SECONDS} s of this script"

    echo "== 4. input pipeline proxy (TF-free) $(date -u +%T)"
    if [ "${SKIP_INPUT_PROXY:-0}" = 1 ]; then
        echo "skipped: SKIP_INPUT_PROXY=1"
    elif [ $((SECONDS + INPUT_PROXY_TIMEOUT)) -gt "$TOTAL_BUDGET_S" ]; then
        echo "skipped: ${SECONDS} s spent + ${INPUT_PROXY_TIMEOUT} s > ${TOTAL_BUDGET_S} s"
    else
        timeout -k 5 "$INPUT_PROXY_TIMEOUT" "$PY" "$PROXY" --root demo/cifar10_lt6 \
            --seconds "$INPUT_PROXY_SECONDS" --gpu-json "$OUT/gpu_h100.json" \
            --out "$OUT/input_proxy.md"
        echo "input proxy exit status $?"
    fi
    echo "== done after ${SECONDS} s; files in $OUT:"
    ls -la "$OUT"
}

main 2>&1 | tee "$OUT/device_run.log"
