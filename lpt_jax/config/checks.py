"""One pass over every config value a run reads, before anything is built or written: each
bad value is one `ConfigError` line naming the field, the value and what it accepts."""

from __future__ import annotations

import math

import jax

from lpt_jax import tree
from lpt_jax.backbones.vit import ATTENTION_IMPLEMENTATIONS, POOL_TYPES
from lpt_jax.errors import ConfigError
from lpt_jax.method import losses
from lpt_jax.method.phases import PHASES, parse_phases
from lpt_jax.storage import files
from lpt_jax.text.tower import POOL_TYPES as TEXT_POOL_TYPES

HEAD_INITS = ("random", "text")  # model.head_init: lpt_jax.text_head for 'text'


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# field -> (test, what it accepts); sections of every phase are added below.
_RULES = {
    "optim.base_lr": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "optim.lr_reference_batch": (lambda v: v >= 1, "an integer >= 1"),
    "optim.warmup_lr": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "optim.warmup_epochs": (lambda v: v >= 0, "an integer >= 0"),
    "optim.momentum": (lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    "optim.weight_decay": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "model.lpt.prompt_length": (lambda v: v >= 1, "an integer >= 1"),
    "model.lpt.pool_size": (lambda v: v >= 1, "an integer >= 1"),
    "model.lpt.shared_depth": (lambda v: v >= 0, "an integer >= 0"),
    "model.lpt.top_k": (lambda v: v >= 1, "an integer >= 1"),
    "model.lpt.head_dropout": (lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    "model.lpt.prompt_init_std": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "model.lpt.prompt_position": (lambda v: v in ("append", "after_cls"),
                                  "'append' or 'after_cls'"),
    "loss.match_weight": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "data.cb_images_per_class": (lambda v: v >= 1, "an integer >= 1"),
    "data.ib_sampling": (lambda v: v in ("epoch_permutation", "independent"),
                         "'epoch_permutation' or 'independent'"),
    "train.log_every_steps": (lambda v: v >= 1, "an integer >= 1"),
    "train.checkpoint_every_steps": (lambda v: v >= 1, "an integer >= 1"),
    "train.keep_checkpoints": (lambda v: v >= 1, "an integer >= 1 (0 would keep no "
                                                 "checkpoint to resume from)"),
    "train.max_steps": (lambda v: v >= 0, "an integer >= 0 (0: no limit)"),
    "train.stop_after_steps": (lambda v: v >= 0, "an integer >= 0 (0: no limit)"),
    "train.num_devices": (lambda v: v >= 0, "an integer >= 0 (0: all devices)"),
    "train.on_nonfinite": (lambda v: v in ("stop", "skip"), "'stop' or 'skip'"),
    "eval.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "eval.every_epochs": (lambda v: v >= 0, "an integer >= 0 (0: only at the end of a phase)"),
    "eval.max_examples": (lambda v: v >= 0, "an integer >= 0 (0: the whole split)"),
    "eval.final_split": (lambda v: v in ("val", "test"), "'val' or 'test'"),
    "predict.top_k": (lambda v: v >= 1, "an integer >= 1"),
    "predict.batch_size": (lambda v: v >= 1, "an integer >= 1"),
}
for _phase in PHASES.values():
    _RULES[f"{_phase.name}.epochs"] = (lambda v: v >= 1, "an integer >= 1")
    _RULES[f"{_phase.name}.batch_size"] = (lambda v: v >= 1, "an integer >= 1")
for _branch in ("cb", "ib"):
    _RULES[f"loss.{_branch}.name"] = (lambda v: v in losses.LOSSES,
                                      f"one of {sorted(losses.LOSSES)}")
    _RULES[f"loss.{_branch}.scale"] = (lambda v: _finite(v) and v > 0, "a finite number > 0")


def check(config) -> None:
    """Raises ConfigError for the first value that cannot work."""
    for field, (ok, accepts) in _RULES.items():
        value = tree.lookup(config, field)
        if not ok(value):
            raise ConfigError(f"{field}={value!r}: expected {accepts}")
    parse_phases(config.train.phases)
    lpt = config.model.lpt
    if lpt.top_k > lpt.pool_size:
        raise ConfigError(f"model.lpt.top_k={lpt.top_k}: expected an integer in "
                          f"[1, model.lpt.pool_size={lpt.pool_size}]")
    name = config.model.get("backbone", "vit")
    size = config.model[name].image_size
    if size != config.data.image_size:
        raise ConfigError(f"model.{name}.image_size={size} but data.image_size="
                          f"{config.data.image_size}: the backbone is built for the training "
                          "crop size")
    attention = config.model[name].get("attention")
    if attention is not None and attention not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(f"model.{name}.attention={attention!r}: expected one of "
                          f"{ATTENTION_IMPLEMENTATIONS} ('auto': 'einsum' on CPU, 'xla' on "
                          "accelerators)")
    if attention == "cudnn" and jax.default_backend() != "gpu":
        raise ConfigError(f"model.{name}.attention='cudnn' needs an NVIDIA GPU (cuDNN), but "
                          f"JAX runs on {jax.default_backend()}: use 'auto'")
    pool = config.model[name].get("pool_type")
    if pool is not None and pool not in POOL_TYPES:
        raise ConfigError(f"model.{name}.pool_type={pool!r}: expected one of {POOL_TYPES} "
                          "('map': big_vision's MAP head, SigLIP image towers)")
    subtree = config.backbone.get("subtree", "")
    if not isinstance(subtree, str) or subtree.strip("/") != subtree:
        raise ConfigError(f"backbone.subtree={subtree!r}: expected a tower name such as 'img' "
                          "(SigLIP two-tower files), or '' for a single-tower file")
    _check_head_init(config)


def _one_slot(template) -> bool:
    """A prompt template with one '{}' for the class name and nothing else to fill."""
    try:
        return isinstance(template, str) and "{}" in template and bool(template.format("x"))
    except (IndexError, KeyError, ValueError):
        return False


def _check_head_init(config) -> None:
    """model.head_init and, for 'text', the model.text values and the tokenizer file."""
    head_init = config.model.get("head_init", "random")
    if head_init not in HEAD_INITS:
        raise ConfigError(f"model.head_init={head_init!r}: expected one of {HEAD_INITS}")
    if head_init != "text":
        return
    text = config.model.text
    for field, ok, accepts in (
            ("max_len", lambda v: v >= 2, "an integer >= 2 (a piece and the end token)"),
            ("vocab_size", lambda v: v >= 1, "an integer >= 1"),
            ("batch_size", lambda v: v >= 1, "an integer >= 1"),
            ("pool_type", lambda v: v in TEXT_POOL_TYPES, f"one of {TEXT_POOL_TYPES}"),
            ("subtree", lambda v: isinstance(v, str), "a string ('txt' in SigLIP files)")):
        if not ok(text[field]):
            raise ConfigError(f"model.text.{field}={text[field]!r}: expected {accepts}")
    templates = text.templates
    if isinstance(templates, str) or not templates or not all(map(_one_slot, templates)):
        raise ConfigError(f"model.text.templates={templates!r}: expected a non-empty tuple of "
                          "strings, each with '{}' where the class name goes, e.g. "
                          "('a photo of a {}.',)")
    if not text.tokenizer:
        raise ConfigError("model.head_init='text' needs model.text.tokenizer: the path of the "
                          "text tower's SentencePiece model (SigLIP en: "
                          "gs://t5-data/vocabs/cc_en.32000/sentencepiece.model)")
    try:
        found = files.exists(text.tokenizer)
    except OSError as e:  # e.g. RemoteError: gs:// without a network
        raise ConfigError(f"model.text.tokenizer={text.tokenizer!r}: cannot reach it ({e}); "
                          "copy it once and point the field at the local copy") from None
    if not found:
        raise ConfigError(f"model.text.tokenizer={text.tokenizer!r}: no such file")
