"""Checks a finished demo run against the band in demo/expected_results.json.

    python tools/check_demo.py runs/demo

Prints one line per figure (measured, band) and exits 1 when one is outside its band, or
when the run's results are missing or are not the demo's (test split, phase 2).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

EXPECTED = Path(__file__).resolve().parent.parent / "demo" / "expected_results.json"


def check(workdir: str) -> list[str]:
    """The failures ([] when every figure is in its band); raises ValueError for a run whose
    results cannot be judged."""
    path = Path(workdir) / "results" / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the demo's results ({e})") from None
    if not isinstance(results, dict) or results.get("split") != "test" \
            or results.get("phase") != 2:
        raise ValueError(f"{path}: not the results of a finished demo run (test split, "
                         "phase 2)")
    band = json.loads(EXPECTED.read_text())["band"]
    got = {"overall": results.get("overall"), **(results.get("release") or {})}
    failures = []
    for name, (low, high) in band.items():
        value = got.get(name)
        ok = isinstance(value, (int, float)) and low <= value <= high
        shown = f"{value:.2f}" if isinstance(value, (int, float)) else repr(value)
        print(f"{name:8s} {shown:>7s}   band [{low:.2f}, {high:.2f}]   {'ok' if ok else 'OUT'}")
        if not ok:
            failures.append(f"{name} {shown} is outside [{low}, {high}]")
    return failures


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python tools/check_demo.py WORKDIR", file=sys.stderr)
        return 2
    try:
        failures = check(argv[1])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if failures:
        print("error: the demo's end point left its band: " + "; ".join(failures)
              + f" (see {EXPECTED.name})", file=sys.stderr)
        return 1
    print("the demo's end point is within its band")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
