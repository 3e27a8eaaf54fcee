"""The training phases as data: what each one runs, trains and starts from.

Adding a phase is one more `Phase` in `PHASES` (plus its `config.phase<n>` section); the
trainer, the train step, the exports and inference read everything phase-specific from here.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax.numpy as jnp

from lpt_jax.errors import ConfigError
from lpt_jax.method.lpt import LPT, TRAINABLE


@dataclasses.dataclass(frozen=True)
class Phase:
    number: int
    forward_method: Callable        # an LPT method: (images, train) -> logits or dict
    trainable: tuple[str, ...]      # regexes over parameter paths (default of config.phase<n>)
    starts_from: Optional[int]      # the phase whose export initialises this one
    selects_prompts: bool           # the forward picks pool prompts (match term, indices)

    @property
    def name(self) -> str:
        return f"phase{self.number}"  # also the config section and the workdir folder

    def section(self, config):
        return config[self.name]

    def trainable_patterns(self, config) -> tuple[str, ...]:
        return tuple(self.section(config).get("trainable", self.trainable))

    def exported_patterns(self) -> tuple[str, ...]:
        """What this phase's export holds: what it trains plus what the phases it starts from
        trained, so the file alone (next to the backbone) reproduces its predictions."""
        earlier = PHASES[self.starts_from].exported_patterns() if self.starts_from else ()
        return earlier + self.trainable

    def seed(self, config) -> int:
        return config.seed + 1000 * self.number

    def forward(self, model: LPT) -> Callable:
        """(params, images, train, dropout_rng) -> dict(logits, match, indices); phases that
        select no prompts return match 0 and indices None."""
        def forward(params, images, train, rng):
            rngs = {"dropout": rng} if train else {}
            out = model.apply({"params": params}, images, train, method=self.forward_method,
                              rngs=rngs)
            if not self.selects_prompts:
                out = {"logits": out, "match": jnp.zeros((), jnp.float32), "indices": None}
            return out
        return forward


PHASES = {
    1: Phase(1, LPT.phase1, TRAINABLE[1], starts_from=None, selects_prompts=False),
    2: Phase(2, LPT.phase2, TRAINABLE[2], starts_from=1, selects_prompts=True),
}


def parse_phases(spec) -> tuple[Phase, ...]:
    """'1,2' (config.train.phases) -> the phases to run, in order."""
    try:
        numbers = tuple(int(p) for p in str(spec).replace(" ", "").split(",") if p)
    except ValueError:
        numbers = ()
    if (not numbers or any(n not in PHASES for n in numbers)
            or list(numbers) != sorted(set(numbers))):
        known = ", ".join(str(n) for n in PHASES)
        raise ConfigError(f"train.phases={spec!r}: expected increasing phase numbers from "
                          f"{{{known}}}, e.g. '1', '2' or '1,2'")
    return tuple(PHASES[n] for n in numbers)
