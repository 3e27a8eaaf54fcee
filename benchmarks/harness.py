"""The benchmark harness: case registry, timing, fresh processes, results with history.

No lpt_jax, no jax (the PyTorch script uses it too). `@case` registers fn(args, rec), `@child`
a function `fresh` runs in a new process (JSON in and out). `timed`: wall and CPU seconds of
the process; `round_robin`: variants called in turn in one process; `alternate`: sides in
fresh processes taking turns. `Record`: results/<stem>.md gets each run as a `## Run ...`
section under the title, above the earlier ones; results/<stem>.json is {"runs": [...]},
oldest first (a file from before the harness becomes runs[0]); every run records the command,
the commit and the machine. A case may write several times: its own section is replaced.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import host

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
BENCH = HERE / "bench.py"
CASES: dict = {}
CHILDREN: dict = {}
Case = collections.namedtuple("Case", "name fn stem summary options")  # stem: str | fn(args)
median = statistics.median


def log(msg: str) -> None:
    print(msg, flush=True)


def arg(*flags, **kwargs):
    return flags, kwargs


def case(name: str, stem, summary: str, *options):
    def register(fn):
        CASES[name] = Case(name, fn, stem, summary, options)
        return fn
    return register


def child(name: str):
    def register(fn):
        CHILDREN[name] = fn
        return fn
    return register


# ----------------------------------------------------------------------------- timing


def timed(fn, *a, **kw):
    """(wall seconds, CPU seconds of this process, fn's result)."""
    w, c = time.perf_counter(), time.process_time()
    out = fn(*a, **kw)
    return time.perf_counter() - w, time.process_time() - c, out


def round_robin(items, rounds: int, *, warmup: int = 1, min_seconds: float = 0.0) -> None:
    """Times `.call()` (-> (wall, cpu)) of the items in turn (load changes hit all alike), at
    least `rounds` rounds and `min_seconds` (200 rounds at most); sets `.times` and `.cpu`."""
    for it in items:
        for _ in range(warmup):
            it.call()
        it.times, it.cpu = [], []
    start, n = time.perf_counter(), 0
    while n < rounds or (rounds and time.perf_counter() - start < min_seconds and n < 200):
        for it in items:
            w, c = it.call()
            it.times.append(w)
            it.cpu.append(c)
        n += 1
        log(f"    round {n}: " + ", ".join(f"{it.times[-1]:.3f} s / {it.cpu[-1]:.3f} CPU-s"
                                           for it in items))


def rates(images: int, times, cpu) -> dict:
    """Medians of wall and CPU seconds per call and the images per second of each."""
    s, c = median(times), median(cpu)
    return dict(seconds=s, cpu_seconds=c, images_per_s=images / s,
                images_per_cpu_s=images / c if c else float("nan"), calls=len(times))


def fresh(name: str, payload: dict, *, python: Optional[str] = None, script: Path = BENCH,
          env: Optional[dict] = None) -> dict:
    """The dict child `name` of `script` returns, run in a fresh process."""
    cmd = [python or sys.executable, str(script), "--child", name, json.dumps(payload)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
    lines = [s for s in proc.stdout.splitlines() if s.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{script.name} child {name} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def alternate(sides: dict, rounds: int) -> dict:
    """{name: [fn(round) per round]}, the sides called in order, every other round reversed."""
    out = {k: [] for k in sides}
    for r in range(rounds):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            log(f"round {r + 1}: {name}")
            out[name].append(sides[name](r))
    return out


# ----------------------------------------------------------------------------- results


def commit(repo: Path = REPO) -> str:
    try:
        out = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, check=True).stdout.strip()
        return out or "?"
    except (OSError, subprocess.CalledProcessError):
        return "?"


class Record:
    """One run's entry in results/<stem>.md and .json (see the module docstring)."""

    def __init__(self, stem: str, directory: str, title: str):
        self.stem, self.title, self.text = stem, title, ""
        self.dir = Path(directory) if directory else None
        self.command = "python benchmarks/" + shlex.join([Path(sys.argv[0]).name] + sys.argv[1:])
        self.started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        self.machine = None
        self.old_md, self.old_runs = "", []
        if self.dir:
            md, js = self.dir / f"{stem}.md", self.dir / f"{stem}.json"
            self.old_md = md.read_text() if md.exists() else ""
            old = json.loads(js.read_text()) if js.exists() else None
            self.old_runs = (old["runs"] if isinstance(old, dict) and "runs" in old
                             else [old] if old is not None else [])

    def write(self, text: str, data: dict) -> None:
        """(Re)writes this run's section and JSON entry; earlier runs are kept."""
        if self.machine is None:  # lazily: a GPU case configures jax's client first
            self.machine = dict(host.describe(), commit=commit())
        self.text = text
        if not self.dir:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        lines = self.old_md.splitlines()
        title = lines[0] if lines and lines[0].startswith("# ") else f"# {self.title}"
        old = "\n".join(lines[1:] if lines and lines[0].startswith("# ") else lines).strip()
        if old and "\n## Run " not in "\n" + old:
            old = "## Earlier results (before benchmarks/bench.py)\n\n" + old
        section = (f"## Run {self.started}: `{self.command}`\n\n{host.one_line(self.machine)} "
                   f"Commit {self.machine['commit']}.\n\n{text.strip()}\n")
        (self.dir / f"{self.stem}.md").write_text(
            f"{title}\n\n{section}" + (f"\n{old}\n" if old else ""))
        run = dict(date=self.started, command=self.command, machine=self.machine, **data)
        (self.dir / f"{self.stem}.json").write_text(
            json.dumps({"runs": self.old_runs + [run]}, indent=1, default=str) + "\n")


def table(header: list, rows: list) -> str:
    """A markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in r) + " |"
            for r in rows]
    return "\n".join(out)


def fmt(v, spec: str = ".2f") -> str:
    return "" if v is None or v != v else format(v, spec)  # None / NaN -> empty cell


# ----------------------------------------------------------------------------- command line


def main(argv=None, default: Optional[str] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        print(json.dumps(CHILDREN[argv[1]](json.loads(argv[2])), default=str), flush=True)
        return
    if default and (not argv or argv[0] not in CASES):
        argv.insert(0, default)
    p = argparse.ArgumentParser(prog=Path(sys.argv[0]).name,
                                description="CASE --help: its options; --list: the cases")
    cases = p.add_subparsers(dest="case", required=True, metavar="CASE")
    for c in CASES.values():
        sp = cases.add_parser(c.name, help=c.summary, description=c.summary)
        for flags, kwargs in c.options + (arg("--results", default=str(RESULTS), help=(
                "folder of the results files ('' = print only, record nothing)")),):
            sp.add_argument(*flags, **kwargs)
    args = p.parse_args(["--help" if a == "--list" else a for a in argv])
    c = CASES[args.case]
    rec = Record(c.stem(args) if callable(c.stem) else c.stem, args.results, c.summary)
    c.fn(args, rec)
    print("\n" + rec.text, flush=True)
    if rec.dir:
        log(f"recorded in {rec.dir / rec.stem}.md and .json")
