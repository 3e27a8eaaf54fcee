"""The tree of config sections a run reads, assembled from the modules that declare them, and
everything derived from it: the defaults, the checks, the fields of each role, the run's
identity, and the help text.

    seed                 the run (lpt_jax.run.fields)
    model.method         the method (lpt_jax.method.registry); model.<method>: its section
    model.backbone       the frozen backbone (lpt_jax.backbones); model.<backbone>: its section
    model.head_init, model.text     the text-initialised head (lpt_jax.text.head)
    backbone             the backbone file (lpt_jax.backbones)
    data                 the data package (lpt_jax.data.config)
    loss                 the method's
    optim                SGD (lpt_jax.method.optim)
    phase<n>             each of the method's phases
    train, eval, predict the run (lpt_jax.run.fields)
"""

from __future__ import annotations

import json
from typing import Iterator

from lpt_jax import backbones
from lpt_jax.config import fields as f
from lpt_jax.config.fields import BATCHED, EXPORTED, Field, Section
from lpt_jax.data.config import FIELDS as DATA
from lpt_jax.errors import ConfigError
from lpt_jax.method import optim, registry
from lpt_jax.run import fields as run_fields
from lpt_jax.text import head as text_head
from lpt_jax.tree import lookup


def _backbone_fits_data(config, root) -> None:
    """The backbone is built for the training crop size."""
    name = config.model.backbone
    size = config.model[name].get("image_size")
    if size is not None and size != config.data.image_size:
        raise ConfigError(f"model.{name}.image_size={size} but data.image_size="
                          f"{config.data.image_size}: the backbone is built for the training "
                          "crop size", field=f"model.{name}.image_size")


def _phases_exist(config, root) -> None:
    registry.of(config).parse_phases(config.train.phases)


def root(method: str = "lpt", backbone: str = "vit") -> Section:
    """Every section a run of `method` on `backbone` reads."""
    m, b = registry.get(method), backbones.get(backbone)
    model = Section("the model: the method around the frozen backbone", {
        "method": Field(method, "the method around the frozen backbone "
                        f"(lpt_jax.method.registry: {', '.join(registry.known())})",
                        f.one_of(registry.known), EXPORTED, BATCHED),
        "backbone": Field(backbone, "the frozen backbone: the module of that name in "
                          "lpt_jax.backbones, configured by model.<backbone>",
                          f.one_of(backbones.known), EXPORTED, BATCHED),
        "head_init": text_head.HEAD_INIT,
        backbone: b.FIELDS,
        method: m.fields,
        "text": text_head.FIELDS})
    sections = {"seed": run_fields.SEED, "model": model, "backbone": backbones.LOADING,
                "data": DATA, "loss": m.loss, "optim": optim.FIELDS}
    sections.update({p.name: p.fields() for p in m.phases})
    sections.update(train=_train_section(m), eval=run_fields.EVAL, predict=run_fields.PREDICT)
    return Section("a run", sections, rules=(_backbone_fits_data, _phases_exist))


def _train_section(method) -> Section:
    """The train section, whose `phases` default is every phase of `method`."""
    field = run_fields.TRAIN.fields["phases"]
    every = ",".join(str(p.number) for p in method.phases)
    return run_fields.TRAIN.with_fields(
        phases=f.Field(every, field.doc, field.accepts, *field.roles, kind=field.kind))


def of(config) -> Section:
    """The sections of `config`'s method and backbone."""
    try:
        method, backbone = config.model.method, config.model.backbone
    except (AttributeError, KeyError):
        raise ConfigError("the config has no model.method or model.backbone: build configs "
                          "from configs/common.py (lpt_jax.config.schema.defaults)") from None
    return root(method, backbone)


def defaults(method: str = "lpt", backbone: str = "vit"):
    """The ConfigDict of every field at its default (configs/common.py starts from it)."""
    return f.defaults_of(root(method, backbone))


def check(config) -> None:
    """Raises ConfigError for the first value of `config` that cannot work: a value its field
    does not accept, a missing or undeclared field, or a rule over several values."""
    f.check_section(config, of(config), "", ConfigError, root=config)


def fields(config, role: str, *, unless: str = "") -> Iterator[str]:
    """Dotted paths of `config`'s fields that have `role` (and not the role `unless`)."""
    for path, field, _ in of(config).walk():
        if field.has(role) and not (unless and field.has(unless)):
            yield path


def run_defining(config) -> dict:
    """The fields that define what a run computes, as nested plain values: every field of a
    run-defining section but the locations and the incidental ones."""
    out: dict = {}
    for path, field, run_defining_section in of(config).walk():
        if not run_defining_section or field.has(f.LOCATION) or field.has(f.INCIDENTAL):
            continue
        *parents, name = path.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = _plain(lookup(config, path))
    return out


def declared_default(config, path: str):
    """The default a field of `config` is declared with (KeyError if none is declared)."""
    for p, field, _ in of(config).walk():
        if p == path:
            return _plain(field.default)
    raise KeyError(path)


def _plain(value):
    """A value as config.json holds it (tuples as lists)."""
    return json.loads(json.dumps(value, default=str))


def describe(config) -> str:
    """Every field of `config`: its value (and default where it differs), what it accepts,
    its roles and its doc; run.py prints this for --help_config."""
    lines, width = [], 0
    rows = []
    for path, field, run_defining_section in of(config).walk():
        value = lookup(config, path, None)
        shown = repr(value) + ("" if value == field.default else f" (default {field.default!r})")
        roles = sorted(field.roles) + ([] if run_defining_section else ["not run-defining"])
        rows.append((path, shown, field.doc, field.accepts, roles))
        width = max(width, len(path))
    for path, shown, doc, accepts, roles in rows:
        lines.append(f"{path.ljust(width)}  {shown}")
        lines.append(f"{'':{width}}    {doc}" + (f"; accepts {accepts.words}" if accepts else "")
                     + (f" [{', '.join(roles)}]" if roles else ""))
    return "\n".join(lines)
