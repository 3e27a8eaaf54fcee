"""Methods by name (`model.method`): what a method around the frozen backbone brings.

A method is one module (`lpt_jax.method.lpt`, `lpt_jax.method.lift`) defining a `METHOD`; the trainer, the train
step, inference, exports and serving read everything method- and phase-specific from it:

    fields             its model section, `model.<name>`
    loss               its `loss` section
    phases             numbered 1, 2, ... (lpt_jax.method.phases)
    build(model_config, num_classes, backbone) -> the Flax model; its params hold the frozen
                       backbone under 'backbone' and a cosine head under 'head'
    objective(config, class_counts, epochs) -> f(forward, params, batch, rng, epoch) ->
                       (loss, {name: scalar}, [picked (B, k) per branch])
    probability_scale(config) -> the softmax temperature of predicted probabilities
    streams(config) -> the batches a step reads of the dual-sampling stream ('cb', 'ib')
    serving_model(model_config, backbone) -> the module a phase's `serve` runs

`register` adds or replaces one (a test can register a toy method or phase for its own
duration); built-in methods are imported on first use.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Optional, Union

from lpt_jax.config.fields import Section
from lpt_jax.errors import ConfigError
from lpt_jax.method.phases import Phase

_BUILTIN = {"lpt": "lpt_jax.method.lpt", "lift": "lpt_jax.method.lift"}   # name -> module defining METHOD
_METHODS: dict[str, "Method"] = {}


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    fields: Section
    loss: Section
    phases: tuple[Phase, ...]
    build: Callable
    objective: Callable
    probability_scale: Callable
    serving_model: Callable
    streams: Callable

    def phase(self, number: int) -> Phase:
        for p in self.phases:
            if p.number == number:
                return p
        raise ConfigError(f"method {self.name!r} has no phase {number!r}; its phases are "
                          f"{[p.number for p in self.phases]}")

    def parse_phases(self, spec) -> tuple[Phase, ...]:
        """train.phases ('1,2', or names 'phase1,phase2') -> the phases to run, in order."""
        names = [p.strip() for p in str(spec).split(",") if p.strip()]
        numbers = [int(n[len("phase"):]) if n.startswith("phase") and n[5:].isdigit()
                   else int(n) if n.isdigit() else None for n in names]
        known = [p.number for p in self.phases]
        if not numbers or None in numbers or any(n not in known for n in numbers) or (
                numbers != sorted(set(numbers))):
            examples = [repr(str(n)) for n in known[:2]] + (
                [repr(",".join(map(str, known)))] if len(known) > 1 else [])
            raise ConfigError(f"train.phases={spec!r}: expected increasing phase numbers from "
                              f"{{{', '.join(map(str, known))}}} ({self.name}), e.g. "
                              f"{', '.join(examples[:-1]) + ' or ' if len(examples) > 1 else ''}"
                              f"{examples[-1]}", field="train.phases")
        return tuple(self.phase(n) for n in numbers)

    def exported_patterns(self, phase: Phase) -> tuple[str, ...]:
        """What `phase`'s export holds: what it trains plus what the phases it starts from
        trained (their default patterns), so the file alone, next to the backbone,
        reproduces its predictions."""
        earlier = (self.exported_patterns(self.phase(phase.starts_from))
                   if phase.starts_from else ())
        return earlier + tuple(phase.trainable)


def register(method: Method) -> Optional[Method]:
    """Adds `method` (or replaces the one of its name); returns the one it replaced."""
    previous = _METHODS.get(method.name)
    _METHODS[method.name] = method
    return previous


def unregister(name: str, previous: Optional[Method] = None) -> None:
    """Removes a registered method, or puts `previous` (what `register` returned) back."""
    if previous is None:
        _METHODS.pop(name, None)
    else:
        _METHODS[name] = previous


def known() -> list[str]:
    return sorted(set(_METHODS) | set(_BUILTIN))


def get(name: Union[str, Method]) -> Method:
    """The method `name` (`model.method`)."""
    if isinstance(name, Method):
        return name
    if name not in _METHODS and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])  # registers its METHOD
    if name not in _METHODS:
        raise ConfigError(f"model.method={name!r}: known methods are {known()}",
                          field="model.method")
    return _METHODS[name]


def of(config) -> Method:
    return get(config.model.method)
