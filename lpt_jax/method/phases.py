"""A training phase as data: the model method it runs, what it trains, what it starts from,
its config section, and how it answers mixed-task batches when served.

Every phase's forward returns the same structure, so the train step, inference and serving
never ask which phase they run:

    {"logits": (B, C) cosines, "match": () the key-matching term (0 where nothing is picked),
     "indices": (B, k) the pool entries picked per example ((B, 0) where nothing is picked)}

A method (lpt_jax.method.registry) numbers its phases 1, 2, ...; phase n's config section and
workdir folder are both `phase<n>`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from lpt_jax.config.fields import TRAINING, Field, Section, integer, regexes


@dataclasses.dataclass(frozen=True)
class Phase:
    number: int
    forward_method: Callable          # a model method: (images, train) -> the structure above
    trainable: tuple[str, ...]        # regexes over parameter paths (config.phase<n>.trainable)
    doc: str = ""
    starts_from: Optional[int] = None  # the phase whose export initialises this one
    epochs: int = 10                  # defaults of its config section
    batch_size: int = 256
    # Serving (lpt_jax.serving): `stack(trained trees, task configs)` -> arrays with a leading
    # task axis; `serve(model, variables, stack, images, task)` -> (features (B, D), picked
    # (B, k) or (B, 0)), `model` the method's serving model, `task` each row's index into the
    # stack. A phase without them cannot share a batch with other tasks.
    stack: Optional[Callable] = None
    serve: Optional[Callable] = None
    # Params whose gradient the forward stops by default (the cheaper backward of a frozen
    # trunk): when one of them is trained, the step runs the forward with through_trunk=True.
    trunk: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"phase{self.number}"  # its config section and its workdir folder

    def fields(self) -> Section:
        """Its config section."""
        return Section(self.doc or f"phase {self.number}", roles=frozenset({TRAINING}),
                       fields=dict(
            epochs=Field(self.epochs, "epochs of this phase", integer(at_least=1)),
            batch_size=Field(self.batch_size, "images per stream and step (a dual-sampling step "
                             "sees 2 x batch_size)", integer(at_least=1)),
            trainable=Field(tuple(self.trainable), "regexes over parameter paths: what this "
                            "phase trains (everything else is frozen)", regexes())))

    def section(self, config):
        return config[self.name]

    def trainable_patterns(self, config) -> tuple[str, ...]:
        return tuple(self.section(config).trainable)

    def seed(self, config) -> int:
        return config.seed + 1000 * self.number

    def forward(self, model, through_trunk: bool = False) -> Callable:
        """(params, images, train, dropout_rng) -> {'logits', 'match', 'indices'};
        `through_trunk`: gradients through the `trunk` params too."""
        extra = {"through_trunk": True} if through_trunk else {}

        def forward(params, images, train, rng):
            rngs = {"dropout": rng} if train else {}
            return model.apply({"params": params}, images, train, method=self.forward_method,
                               rngs=rngs, **extra)
        return forward
