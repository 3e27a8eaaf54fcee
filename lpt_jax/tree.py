"""Parameter-tree helpers driven by 'a/b/c' paths: flatten, regex split into trainable/frozen, merge."""

from __future__ import annotations

import re
from typing import Iterable, Mapping

from flax import traverse_util


def flatten(tree: Mapping) -> dict[str, object]:
    """{'a': {'b': x}} -> {'a/b': x}; empty sub-dicts vanish (nested dicts and FrozenDicts
    are nodes, anything else is a leaf)."""
    return traverse_util.flatten_dict(dict(tree), sep="/")


def unflatten(flat: Mapping[str, object]) -> dict:
    """{'a/b': x} -> {'a': {'b': x}} (plain dicts)."""
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def matches(path: str, patterns: Iterable[str]) -> bool:
    """True if any regex in `patterns` fully matches `path`."""
    return any(re.fullmatch(p, path) for p in patterns)


def split(params: Mapping, trainable_patterns: Iterable[str]) -> tuple[dict, dict]:
    """Splits a nested tree into (trainable, frozen) nested trees by full-match regexes on paths."""
    patterns = tuple(trainable_patterns)
    flat = flatten(params)
    trainable = {k: v for k, v in flat.items() if matches(k, patterns)}
    if not trainable:
        raise ValueError(f"no parameter matches the trainable patterns {patterns}; "
                         f"paths are e.g. {sorted(flat)[:5]}")
    frozen = {k: v for k, v in flat.items() if k not in trainable}
    return unflatten(trainable), unflatten(frozen)


def merge(*trees: Mapping) -> dict:
    """Inverse of `split`: the union of disjoint nested trees."""
    flat: dict = {}
    for t in trees:
        for k, v in flatten(t).items():
            if k in flat:
                raise ValueError(f"parameter {k} is in more than one tree")
            flat[k] = v
    return unflatten(flat)


_REQUIRED = object()


def lookup(node, dotted: str, default=_REQUIRED):
    """node['a']['b'] for 'a.b' in nested dicts or ConfigDicts (configs, export meta); a missing
    part gives `default`, or KeyError(dotted) when none is given."""
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, IndexError):
            if default is _REQUIRED:
                raise KeyError(dotted) from None
            return default
    return node
