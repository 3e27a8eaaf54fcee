"""Packaging: `pip install .` builds a wheel of the importable `lpt_jax` package.

The wheel is built offline (`--no-build-isolation --no-index`, the environment's setuptools) from
a copy of the working tree, so the build leaves no `build/` or `*.egg-info` in the repository.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
NOT_COPIED = (".git", ".venv", "venv", "runs", "workdirs", "build", "dist", "*.egg-info",
              "__pycache__", ".pytest_cache")


def _backend_missing() -> str:
    """Why the offline build cannot run here ('' when it can)."""
    if importlib.util.find_spec("setuptools") is None:
        return "setuptools is not installed (pip install -r requirements-test.txt brings it)"
    import setuptools
    version = tuple(int(p) for p in re.findall(r"\d+", setuptools.__version__)[:2])
    if version < (64, 0):
        return f"setuptools {setuptools.__version__} < 64 (pyproject.toml's build-system)"
    if version < (70, 1) and importlib.util.find_spec("wheel") is None:
        return f"setuptools {setuptools.__version__} < 70.1 needs the 'wheel' package"
    return ""


def _requirements(path: Path) -> set:
    """Requirement lines of a requirements file (comments, blanks and -r/-c options dropped)."""
    out = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            out.add(_key(Requirement(line)))
    return out


def _key(req: Requirement):
    return (canonicalize_name(req.name), str(req.specifier), frozenset(req.extras))


def _version() -> str:
    text = (REPO / "lpt_jax" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    reason = _backend_missing()
    if reason:
        pytest.skip(f"cannot build the wheel offline: {reason}")
    tmp = tmp_path_factory.mktemp("packaging")
    src, dist = tmp / "src", tmp / "dist"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*NOT_COPIED))
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(dist), str(src)],
        capture_output=True, text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = list(dist.glob("lpt_jax-*.whl"))
    assert len(wheels) == 1, (os.listdir(dist), proc.stdout[-2000:])
    with zipfile.ZipFile(wheels[0]) as zf:
        yield zf


def test_wheel_holds_the_package_and_its_split_lists(wheel):
    names = set(wheel.namelist())
    for name in ("lpt_jax/__init__.py", "lpt_jax/run/trainer.py", "lpt_jax/method/losses.py",
                 "lpt_jax/data/sampling.py", "lpt_jax/backbones/vit.py",
                 "lpt_jax/data/splits/places_lt/Places_LT_train.txt.gz",
                 "lpt_jax/data/splits/places_lt/classnames.txt"):
        assert name in names, name
    # Every module and every shipped split file of the source tree, byte-identical.
    for path in sorted((REPO / "lpt_jax").rglob("*")):
        rel = path.relative_to(REPO).as_posix()
        if path.is_file() and (path.suffix == ".py" or "/data/splits/" in rel):
            assert rel in names, f"{rel} is missing from the wheel"
    train_list = "lpt_jax/data/splits/places_lt/Places_LT_train.txt.gz"
    assert wheel.read(train_list) == (REPO / train_list).read_bytes()
    # Only lpt_jax: configs/ (used by run.py), tests/, tools/, demo/, benchmarks/ stay outside.
    top = {n.split("/", 1)[0] for n in names}
    assert top == {"lpt_jax", f"lpt_jax-{_version()}.dist-info"}, sorted(top)
    assert not any(n.endswith((".pyc", ".egg-info")) or "__pycache__" in n for n in names)


def test_wheel_metadata_follows_the_requirements_files(wheel):
    meta_name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    # Headers only: the long description (README) follows the first blank line.
    header = wheel.read(meta_name).decode().split("\n\n", 1)[0]
    fields = [line.split(": ", 1) for line in header.splitlines() if ": " in line]
    get = lambda key: [v for k, v in fields if k == key]  # noqa: E731
    assert canonicalize_name(get("Name")[0]) == "lpt-jax"
    assert get("Version") == [_version()]
    assert get("Requires-Python") == [">=3.11"]

    reqs = [Requirement(v) for v in get("Requires-Dist")]
    base = {_key(r) for r in reqs if r.marker is None}
    test = {_key(r) for r in reqs if r.marker is not None and
            r.marker.evaluate({"extra": "test"}) and not r.marker.evaluate({"extra": ""})}
    assert base == _requirements(REPO / "requirements.txt")
    assert test == _requirements(REPO / "requirements-test.txt")
    assert "test" in get("Provides-Extra")
