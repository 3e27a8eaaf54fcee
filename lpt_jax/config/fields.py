"""A config field declared once: its default, the values it accepts, a one-line doc and its
roles. Every check, comparison, list and help text about a field is derived from its `Field`.

    FIELDS = Section("the prompts, pool and head", dict(
        prompt_length=Field(10, "prompt tokens per block", integer(at_least=1), BATCHED),
        top_k=Field(2, "pool entries averaged per image", integer(at_least=1), EXPORTED)))

The module that reads a section declares it (the data package `data`, a backbone module
`model.<backbone>`, the method its model and loss sections, each phase its own section, the
run `train`, `eval`, `predict`); `lpt_jax.config.schema` assembles them into the tree a run
reads and `defaults()` turns that tree into the ml_collections ConfigDict users override with
`--config.a.b=value`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from typing import Any, Callable, Iterator, Mapping, Optional

from lpt_jax.tree import lookup

# Roles: what a field means beyond its value.
LOCATION = "location"      # says only where an input is: not part of the run's identity (what
                           # it points at is compared by content: backbone hash, data counts)
INCIDENTAL = "incidental"  # changes how a result is computed or fetched (kernels, retries,
                           # threads), never what it is: not run-defining, need not agree
                           # between exports or served tasks
EXPORTED = "exported"      # changes the outputs but no parameter's shape: an export is used
                           # only with the value it was trained with
BATCHED = "batched"        # shapes the tokens every example of a batch goes through: tasks
                           # served in one batch must agree on it
SERVING = "serving"        # set by the multi-export command line (every other setting of a
                           # served task comes from its export)
TRAINING = "training"      # read only while training: evaluation and prediction take the
                           # model and head from the export and refuse an override of it
ROLES = (LOCATION, INCIDENTAL, EXPORTED, BATCHED, SERVING, TRAINING)


@dataclasses.dataclass(frozen=True)
class Accepts:
    """What values a field accepts: `test(value) -> bool` and the words for an error line."""
    test: Callable[[Any], bool]
    words: str

    def __call__(self, value) -> bool:
        try:
            return bool(self.test(value))
        except (TypeError, ValueError):
            return False


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(at_least: Optional[int] = None, note: str = "") -> Accepts:
    words = "an integer" + (f" >= {at_least}" if at_least is not None else "")
    return Accepts(lambda v: isinstance(v, int) and not isinstance(v, bool)
                   and (at_least is None or v >= at_least), words + (f" ({note})" if note else ""))


def number(above: Optional[float] = None, at_least: Optional[float] = None,
           below: Optional[float] = None) -> Accepts:
    """A finite number with optional bounds (above: >, at_least: >=, below: <)."""
    if at_least is not None and below is not None:
        words = f"a number in [{at_least:g}, {below:g})"
    else:
        words = "a finite number" + "".join(
            f" {op} {b:g}" for op, b in ((">", above), (">=", at_least), ("<", below))
            if b is not None)
    return Accepts(lambda v: _number(v) and math.isfinite(v)
                   and (above is None or v > above) and (at_least is None or v >= at_least)
                   and (below is None or v < below), words)


def one_of(*values, note: str = "") -> Accepts:
    """One of `values` (a callable: the values are read when checked, e.g. a registry's)."""
    def current():
        return tuple(values[0]()) if len(values) == 1 and callable(values[0]) else values

    class _Words:  # the allowed values may grow after declaration (registries)
        def __str__(self):
            vs = current()
            text = " or ".join(map(repr, vs)) if len(vs) <= 2 else f"one of {list(vs)}"
            return text + (f" ({note})" if note else "")
    return Accepts(lambda v: v in current(), _Words())  # type: ignore[arg-type]


def boolean() -> Accepts:
    return Accepts(lambda v: isinstance(v, bool), "True or False")


def text(pattern: Optional[str] = None, words: str = "a string") -> Accepts:
    return Accepts(lambda v: isinstance(v, str) and (pattern is None or re.fullmatch(pattern, v)),
                   words)


def regexes() -> Accepts:
    """A tuple of regular expressions (over parameter paths)."""
    def ok(v):
        if isinstance(v, str) or not v:
            return False
        for p in v:
            re.compile(p)
        return True
    return Accepts(ok, "a non-empty tuple of regular expressions, e.g. ('head/.*',)")


def patterns() -> Accepts:
    """A tuple (possibly empty) of regular expressions."""
    def ok(v):
        if isinstance(v, str):
            return False
        for p in v:
            re.compile(p)
        return True
    return Accepts(ok, "a tuple of regular expressions (possibly empty)")


@dataclasses.dataclass(frozen=True)
class Field:
    """One config value: its default, a one-line doc, what it accepts and its roles.
    `kind`: the field may be None (unset), and a None default is a typed placeholder."""
    default: Any
    doc: str
    accepts: Optional[Accepts] = None
    roles: frozenset = frozenset()
    kind: Optional[type] = None

    def __init__(self, default, doc: str, accepts: Optional[Accepts] = None, *roles: str,
                 kind: Optional[type] = None):
        unknown = [r for r in roles if r not in ROLES]
        if unknown:
            raise ValueError(f"unknown roles {unknown}; known: {ROLES}")
        for name, value in (("default", default), ("doc", doc), ("accepts", accepts),
                            ("roles", frozenset(roles)), ("kind", kind)):
            object.__setattr__(self, name, value)

    def has(self, role: str) -> bool:
        return role in self.roles

    def with_roles(self, roles: frozenset) -> "Field":
        return Field(self.default, self.doc, self.accepts, *(self.roles | roles), kind=self.kind)

    def check(self, value) -> bool:
        if value is None and (self.default is None or self.kind is not None):
            return True  # unset: a typed field may be None (`kind`)
        return self.accepts is None or self.accepts(value)


# A rule checks values of several fields together: rule(config) raises ConfigError.
Rule = Callable[[Any], None]


@dataclasses.dataclass(frozen=True)
class Section:
    """Named fields and sub-sections. `run_defining=False`: nothing in it defines what a run
    computes (train / eval / predict: how long, how often, where to write); `rules` check
    several of its values together; `roles` are added to every field inside it."""
    doc: str
    fields: Mapping[str, Any]          # name -> Field or Section
    run_defining: bool = True
    rules: tuple = ()
    roles: frozenset = frozenset()

    def walk(self, prefix: str = "", roles: frozenset = frozenset(), run_defining: bool = True
             ) -> Iterator[tuple[str, Field, bool]]:
        """(dotted path, field with inherited roles, whether its sections are run-defining)."""
        roles = roles | self.roles
        run_defining = run_defining and self.run_defining
        for name, item in self.fields.items():
            path = f"{prefix}{name}"
            if isinstance(item, Section):
                yield from item.walk(path + ".", roles, run_defining)
            elif roles - item.roles:
                yield path, item.with_roles(roles), run_defining
            else:
                yield path, item, run_defining

    def sections(self, prefix: str = "") -> Iterator[tuple[str, "Section"]]:
        """(dotted path, section) of this section and every section inside it."""
        yield prefix.rstrip("."), self
        for name, item in self.fields.items():
            if isinstance(item, Section):
                yield from item.sections(f"{prefix}{name}.")

    def with_fields(self, **extra) -> "Section":
        return dataclasses.replace(self, fields={**self.fields, **extra})


# ------------------------------------------------------------------------------------------
# A section's defaults as a ConfigDict, and the check of a ConfigDict against a section.

def defaults_of(section: Section):
    """The ml_collections ConfigDict holding every field of `section` at its default (a field
    whose default is None holds a typed placeholder)."""
    import ml_collections
    from ml_collections.config_dict import placeholder

    def build(sec: Section):
        out = ml_collections.ConfigDict()
        for name, item in sec.fields.items():
            if isinstance(item, Section):
                out[name] = build(item)
            elif item.default is None and item.kind is not None:
                out[name] = placeholder(item.kind)
            else:
                out[name] = item.default
        return out
    return build(section)


_MISSING = object()


def leaves(node, prefix: str = "") -> Iterator[str]:
    """Dotted paths of the values (not sections) in a nested dict / ConfigDict."""
    for key in node.keys():
        value = node[key]
        if hasattr(value, "keys") and not isinstance(value, str):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def check_section(cfg, section: Section, prefix: str, error, root=None) -> None:
    """Raises `error` (an lpt_jax.errors type) for the first value of `cfg` (the ConfigDict of
    `section`, whose dotted path is `prefix`) that the section's declarations refuse: a value
    its field does not accept, a declared field that is missing, an undeclared one; then the
    section's rules, given `root` (the whole config, or None when a section is checked alone)."""
    declared = {}
    for path, field, _ in section.walk():
        declared[path] = field
        value = lookup(cfg, path, _MISSING)
        if value is _MISSING:
            raise error(f"{prefix}{path} is missing from the config: build configs from "
                        "configs/common.py (lpt_jax.config.schema.defaults)",
                        field=f"{prefix}{path}")
        if not field.check(value):
            raise error(f"{prefix}{path}={value!r}: expected {field.accepts.words}",
                        field=f"{prefix}{path}")
    for path in leaves(cfg):
        if path not in declared:
            close = difflib.get_close_matches(path, list(declared), n=1)
            raise error(f"{prefix}{path} is not a field lpt_jax reads"
                        + (f"; did you mean {prefix}{close[0]}?" if close else ""),
                        field=f"{prefix}{path}")
    for path, sub in section.sections():
        node = lookup(cfg, path) if path else cfg
        for rule in sub.rules:
            rule(node, root)
