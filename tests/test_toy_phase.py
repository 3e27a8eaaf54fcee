"""A phase is data: this file defines a third LPT phase — its forward, what it trains, what it
starts from, its serving forward — registers LPT with it for the file's duration, and runs it
end to end (train 1, 2, 3; export; evaluate; serve a phase-3 export beside a phase-1 and a
phase-2 one in one mixed batch) with no edit anywhere else in the repository.

Phase 3 ("shallow"): the shared prompt in blocks 0..K-1 only, no prompt after them, the head
retrained from phase 2's export. Its config section, workdir folder, run identity and export
contents all come from the declaration."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from lpt_jax.config import schema
from lpt_jax.method import lpt, registry
from lpt_jax.method.lpt_model import PromptedBackbone
from lpt_jax.method.phases import Phase
from lpt_jax.run import exports, inference, rundir, trainer

from tiny_run import assert_mixed_batch_matches_single_tasks, tiny_config


def shallow(model, images, train=False):
    """The forward: {logits, match, indices, query} as every phase returns it."""
    x = model.trunk(images)
    feature = model._feature(x, model.shared_depth, lambda i: None)  # no prompt after K
    return dict(logits=model._classify(feature, train), match=jnp.zeros((), jnp.float32),
                indices=jnp.zeros((images.shape[0], 0), jnp.int32), query=feature)


def stack(trained, configs):
    return {"shared": np.stack([np.asarray(t["shared_prompt"], np.float32) for t in trained])}


def serve(model: PromptedBackbone, variables, stacked, images, task):
    shared = jnp.take(stacked["shared"], task, axis=0)
    x = model.apply(variables, images, shared, method=PromptedBackbone.trunk)
    feature = model.apply(variables, x, method=lambda m, x: m._feature(x, m.shared_depth,
                                                                        lambda i: None))
    return feature, jnp.zeros((images.shape[0], 0), jnp.int32)


SHALLOW = Phase(3, shallow, (r"head/.*",), doc="phase 3: the head on a shallow prompt",
                starts_from=2, epochs=1, batch_size=8, stack=stack, serve=serve)


@pytest.fixture(scope="module")
def with_phase3():
    previous = registry.register(dataclasses.replace(lpt.METHOD, phases=lpt.PHASES + (SHALLOW,)))
    yield
    registry.unregister("lpt", previous)


def test_a_registered_phase_runs_end_to_end(with_phase3, tmp_path):
    config = tiny_config(tmp_path, epochs=1)  # base_config now declares phase3
    assert config.phase3.trainable == ("head/.*",) and config.phase3.epochs == 1
    assert "phase3" in schema.run_defining(config)  # derived from the phases
    config.train.phases, config.train.max_steps, config.eval.plot = "1,2,3", 3, False
    workdir = str(tmp_path / "wd")
    report = trainer.train(config, workdir)
    assert report["phase"] == 3 and 0 <= report["overall"] <= 100

    # Its export holds what it and the phases it starts from trained, and only the head moved.
    p2, _ = exports.read(rundir.export_path(workdir, 2))
    p3, meta = exports.read(rundir.export_path(workdir, 3))
    assert meta["phase"] == 3 and set(p3) == {"shared_prompt", "pool_prompts", "pool_keys",
                                              "head"}
    np.testing.assert_array_equal(p3["pool_keys"], p2["pool_keys"])
    assert np.abs(p3["head"]["kernel"] - p2["head"]["kernel"]).max() > 0

    # Evaluation reads the workdir's newest export: phase 3's.
    assert inference.evaluate_workdir(config, workdir)["phase"] == 3

    # A changed phase-3 setting is a different run.
    config.phase3.epochs = 2
    with pytest.raises(Exception, match="phase3.epochs"):
        trainer.train(config, workdir)

    # Serving: phase 3 beside phases 1 and 2, in one batch, each row equal to its task's own
    # single-task prediction.
    paths = {f"p{n}": rundir.export_path(workdir, n) for n in (1, 2, 3)}
    images = np.random.default_rng(0).uniform(-1, 1, (7, 32, 32, 3)).astype(np.float32)
    config.phase3.epochs = 1
    assert_mixed_batch_matches_single_tasks(config, workdir, paths,
                                            ["p3", "p1", "p2", "p3", "p2", "p1", "p3"], images)
