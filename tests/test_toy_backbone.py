"""A backbone family is one module plus its config: this file defines a toy trunk (its Flax
module, its config section, its own weight-file format and loader, the params it keeps in
float32), registers it for the file's duration, and runs LPT on it end to end — train both
phases, export, evaluate, and serve two exports in one mixed batch — with no edit anywhere
else in the repository.

The toy trunk is not a ViT: patches go through one Dense, each block is a single-head
attention over [tokens; extras] plus a tanh MLP, the feature is the mean of the normed tokens.
Its weights live in its own .npz layout ('toy/<name>')."""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.common import base_config
from lpt_jax import backbones, tree
from lpt_jax.config import fields as f
from lpt_jax.config.fields import EXPORTED, INCIDENTAL, Field, Section
from lpt_jax.errors import CheckpointError
from lpt_jax.run import exports, inference, rundir, trainer
from lpt_jax.weights.npz import read_npz, write_npz

from helpers import make_image_folder
from tiny_run import assert_mixed_batch_matches_single_tasks


class ToyBlock(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x, extra=None, position="append"):
        norm = nn.LayerNorm(name="norm")
        y = kv = norm(x)
        if extra is not None:
            e = norm(jnp.broadcast_to(extra, (x.shape[0],) + extra.shape[-2:]))
            kv = (jnp.concatenate([y, e], 1) if position == "append" else
                  jnp.concatenate([y[:, :1], e, y[:, 1:]], 1))
        q, k, v = (nn.Dense(self.width, name=n)(t) for n, t in (("q", y), ("k", kv), ("v", kv)))
        attn = jax.nn.softmax(jnp.einsum("bnd,bsd->bns", q, k) / np.sqrt(self.width), -1)
        x = x + jnp.einsum("bns,bsd->bnd", attn, v)
        return x + nn.Dense(self.width, name="mlp")(jnp.tanh(x))


class ToyTrunk(nn.Module):
    """The backbone interface lpt_jax.backbones documents."""
    width: int = 16
    depth: int = 3
    patch: int = 8
    image_size: tuple = (32, 32)
    dtype: jnp.dtype = jnp.float32
    keep_float32 = (r"norm/",)

    def setup(self):
        self.embedding = nn.Dense(self.width)
        self.blocks = [ToyBlock(self.width, name=f"block{i}") for i in range(self.depth)]
        self.final_norm = nn.LayerNorm()

    def embed(self, images):
        b, h, w, c = images.shape
        p = self.patch
        x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return self.embedding(x.reshape(b, (h // p) * (w // p), p * p * c))

    def encode(self, x, start=0, stop=None, extras=None, extra_position="append"):
        extras = extras or {}
        for i in range(start, self.depth if stop is None else stop):
            x = self.blocks[i](x, extras.get(i), extra_position)
        return x

    def features(self, x):
        return jnp.mean(self.final_norm(x), axis=1)

    def encode_features(self, x, start=0, extras=None, extra_position="append"):
        return self.features(self.encode(x, start, self.depth, extras, extra_position))

    def __call__(self, images):
        return self.features(self.encode(self.embed(images)))


def _from_config(cfg):
    return ToyTrunk(width=cfg.width, depth=cfg.depth, patch=cfg.patch,
                    image_size=(cfg.image_size, cfg.image_size))


def _load_params(path, abstract_params, *, dont_load, ignore, model, subtree):
    """Its own layout: every param under 'toy/', nothing else, shapes equal."""
    arrays = read_npz(path)
    want = tree.flatten(abstract_params)
    have = {k[len("toy/"):]: v for k, v in arrays.items() if k.startswith("toy/")}
    if set(have) != set(want) or any(have[k].shape != want[k].shape for k in want):
        raise CheckpointError(f"{path} is not a toy trunk of this shape")
    return tree.unflatten({k: np.asarray(v, np.float32) for k, v in have.items()})


TOY = types.SimpleNamespace(
    FIELDS=Section("a toy trunk", dict(
        width=Field(16, "token width", f.integer(at_least=1)),
        depth=Field(3, "blocks", f.integer(at_least=1)),
        patch=Field(8, "patch size", f.integer(at_least=1)),
        image_size=Field(32, "input size", f.integer(at_least=8)),
        mood=Field("calm", "changes nothing: a field only this backbone has",
                   f.one_of("calm", "busy"), INCIDENTAL),
        flavour=Field("plain", "changes what an export means", f.one_of("plain", "salty"),
                      EXPORTED))),
    from_config=_from_config, load_params=_load_params)


@pytest.fixture(scope="module")
def toy_registered():
    previous = backbones.register("toy", TOY)
    yield
    backbones.unregister("toy", previous)


def _toy_weights(path, seed=0):
    model = _from_config(f.defaults_of(TOY.FIELDS))
    params = model.init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)))["params"]
    write_npz(str(path), {f"toy/{k}": np.asarray(v) for k, v in tree.flatten(params).items()})
    return str(path)


def _config(tmp_path):
    c = base_config(backbone="toy")
    c.backbone.checkpoint = _toy_weights(tmp_path / "toy.npz")
    c.backbone.ignore = ()
    c.model.lpt.update(dict(shared_depth=1, pool_size=4, prompt_length=3))
    c.data.name, c.data.root = "image_folder", str(make_image_folder(tmp_path / "data"))
    c.data.image_size, c.data.resize_size = 32, 36
    for phase in (c.phase1, c.phase2):
        phase.epochs, phase.batch_size = 1, 8
    c.train.max_steps, c.optim.warmup_epochs = 3, 0
    c.eval.batch_size, c.eval.plot = 8, False
    return c


def test_toy_backbone_end_to_end(toy_registered, tmp_path):
    config = _config(tmp_path)
    assert "toy" in config.model and "vit" not in config.model  # its section, from FIELDS
    workdir = str(tmp_path / "wd")
    report = trainer.train(config, workdir)
    assert 0 <= report["overall"] <= 100
    _, meta = exports.read(rundir.export_path(workdir, 2))
    assert meta["config"]["model"]["backbone"] == "toy"

    # Its roles are derived from its declarations: an incidental field resumes the workdir, an
    # exported one refuses an export trained with another value.
    config.model.toy.mood = "busy"
    trainer.train(config, workdir)  # finished phases are skipped: same run
    config.model.toy.mood = "calm"
    evaluated = inference.evaluate_workdir(config, workdir)
    assert evaluated["overall"] == report["overall"]
    salty = config.copy_and_resolve_references()
    salty.model.toy.flavour = "salty"
    with pytest.raises(exports.ExportError, match=r"model.toy.flavour='plain'"):
        inference.evaluate_workdir(salty, workdir)

    # Serving: a phase-1 and a phase-2 export of the run on one toy trunk, in one mixed batch,
    # equal to each export's single-task prediction.
    paths = {"p1": rundir.export_path(workdir, 1), "p2": rundir.export_path(workdir, 2)}
    images = np.random.default_rng(0).uniform(-1, 1, (6, 32, 32, 3)).astype(np.float32)
    assert_mixed_batch_matches_single_tasks(config, workdir, paths,
                                            ["p2", "p1", "p1", "p2", "p2", "p1"], images)


def test_toy_backbone_config_is_checked_from_its_declarations(toy_registered, tmp_path):
    from lpt_jax.config import schema
    from lpt_jax.errors import ConfigError
    config = base_config(backbone="toy")
    config.model.toy.patch = 0
    with pytest.raises(ConfigError, match=r"model.toy.patch=0: expected an integer >= 1"):
        schema.check(config)
    assert "model.toy.flavour" in list(schema.fields(config, EXPORTED))
    assert "model.toy.mood" not in str(schema.run_defining(config))
