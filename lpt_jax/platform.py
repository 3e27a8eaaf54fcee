"""CPU defaults: XLA options measured to be faster and numerically safe for LPT's steps.

    from lpt_jax import platform
    platform.configure_for_cpu()   # before the first JAX computation (run.py does it first)

The choice comes from benchmarks/bench_xla_cpu_flags.py (results/xla_cpu_flags.md). Flags are
added to XLA_FLAGS only when the run will be on CPU, only before JAX has started a backend, and
never replace a flag the user already set. LPT_NO_CPU_DEFAULTS=1 turns this off (benchmarks
that measure the flags themselves).
"""

from __future__ import annotations

import importlib.util
import os
import sys

# Measured best safe options (flag -> value); empty when no option beat XLA's default.
# See benchmarks/results/xla_cpu_flags.md for the numbers behind this choice.
CPU_XLA_FLAGS: dict[str, str] = {}

_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin", "libtpu", "jax_plugins.xla_cuda12")


def cpu_xla_flags() -> str:
    """The XLA_FLAGS words this module adds on CPU ('' when the default is best)."""
    return " ".join(f"--{k}={v}" for k, v in CPU_XLA_FLAGS.items())


def _flag_names(flags: str) -> set[str]:
    return {w.split("=", 1)[0].lstrip("-") for w in flags.split() if w.startswith("--")}


def merged_xla_flags(existing: str, extra: str) -> str:
    """`existing` plus the words of `extra` whose flag names it does not set already."""
    have = _flag_names(existing)
    added = [w for w in extra.split() if w.split("=", 1)[0].lstrip("-") not in have]
    return " ".join([existing.strip()] + added).strip() if added else existing


def runs_on_cpu(environ=None) -> bool:
    """True when JAX will pick the CPU: JAX_PLATFORMS says cpu first, or no accelerator
    plugin is installed (decided without starting a backend)."""
    environ = os.environ if environ is None else environ
    platforms = (environ.get("JAX_PLATFORMS") or environ.get("JAX_PLATFORM_NAME") or "").lower()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(_installed(name) for name in _ACCELERATOR_PLUGINS)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _backends_started() -> bool:
    jax = sys.modules.get("jax")
    if jax is None:
        return False
    try:
        from jax._src import xla_bridge
        return bool(getattr(xla_bridge, "_backends", None))
    except ImportError:  # private module moved: assume started, so we never half-apply
        return True


def configure_for_cpu(environ=None) -> str:
    """Adds the measured CPU options to XLA_FLAGS when the run will be on CPU and JAX has not
    started a backend yet. Returns the resulting XLA_FLAGS (unchanged when nothing applies)."""
    environ = os.environ if environ is None else environ
    current = environ.get("XLA_FLAGS", "")
    extra = cpu_xla_flags()
    if (not extra or environ.get("LPT_NO_CPU_DEFAULTS") == "1" or not runs_on_cpu(environ)
            or _backends_started()):
        return current
    merged = merged_xla_flags(current, extra)
    environ["XLA_FLAGS"] = merged
    return merged
