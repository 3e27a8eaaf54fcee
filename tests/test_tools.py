"""tools/: the replication script's --help is complete and fast, and its runs still resolve."""

import ast
import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "replicate_ablation.py"

# Runs the script as `python tools/replicate_ablation.py --help` would, then reports which of the
# heavy frameworks got imported.
_HELP_PROBE = """
import runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    code = e.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"jax", "flax", "tensorflow", "optax"})
print("HEAVY=" + ",".join(heavy))
sys.exit(code)
"""


def _script():
    """tools/replicate_ablation.py as a module (importing it loads neither JAX nor TF)."""
    spec = importlib.util.spec_from_file_location("_replicate_ablation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_replicate_ablation_help_lists_defaults_variants_and_run_time():
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    variants = _script().VARIANTS
    assert len(variants) == 7 and "lift" in variants
    assert "--set" in out and "comparison" in out
    for name, variant in variants.items():
        assert name in out
        assert variant.help and variant.help in out, name
    for flag, default in (("--workdir", "/tmp/lpt_replication"), ("--seeds", "0,1,2"),
                          ("--max_steps", "0")):
        assert flag in out and f"(default: {default})" in " ".join(out.split())
    assert out.count("default") >= 5
    # The measured times and the machine they were measured on.
    meta = json.loads((REPO / "docs" / "replication_summary.json").read_text())["meta"]
    assert "min wall" in out and meta["machine"] in " ".join(out.split())
    assert elapsed < 10, f"--help took {elapsed:.1f} s"


def test_replicate_ablation_help_imports_no_framework():
    proc = subprocess.run([sys.executable, "-c", _HELP_PROBE, str(SCRIPT)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY=\n" in proc.stdout, proc.stdout[-500:]


def test_replicate_ablation_imports_resolve():
    """Every `lpt_jax` module the script imports exists (lpt_jax.train became lpt_jax.trainer)."""
    modules = set()
    for node in ast.walk(ast.parse(SCRIPT.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lpt_jax"):
            modules.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            modules.update(a.name for a in node.names if a.name.startswith("lpt_jax"))
    assert "lpt_jax.run.trainer" in modules
    for name in modules:
        path = REPO / name.replace(".", "/")
        if path.with_suffix(".py").exists() or (path / "__init__.py").exists():
            continue  # a module
        parent, attr = name.rsplit(".", 1)  # else a name the parent module defines
        source = (REPO / parent.replace(".", "/")).with_suffix(".py")
        assert source.exists() and re.search(rf"^(def|class) {attr}\b|^{attr} *=",
                                             source.read_text(), re.M), name
    assert "lpt_jax.train." not in SCRIPT.read_text()


def test_replicate_ablation_summary_tolerates_groups_without_images():
    """A --max_steps smoke run evaluates 64 images, so some groups have none (None)."""
    module = _script()
    groups = {"many": 50.0, "medium": None, "few": None}
    run = {"test": {"overall": 50.0, "release": groups, "oltr": groups}, "val": None,
           "timing": {"wall_s": 1.0, "cpu_s": 1.0}}
    summary = module.summarize({"lpt_phase1": {0: run, 1: run}})
    test = summary["lpt_phase1"]["test"]["release"]
    assert test["many"]["mean"] == 50.0 and test["few"]["mean"] is None
    assert "| LPT phase 1 | 50.0 ± 0.0 | 50.0 ± 0.0 | – | – | 2 |" in module.markdown(summary)


def test_run_py_help_is_an_answer_not_an_error():
    """`run.py --help` prints the usage (examples and flags) and exits 0, quickly."""
    import subprocess
    import sys

    from helpers import REPO
    out = subprocess.run([sys.executable, str(REPO / "run.py"), "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--config" in out.stdout and "--workdir" in out.stdout and "--mode" in out.stdout
    assert "python run.py --config=configs/places_lt.py" in out.stdout
