"""A cosine head initialised from class names through a SigLIP text tower (`model.head_init=text`).

    class names -> prompts ("a photo of a {}." per template) -> SentencePiece tokens
      -> text tower (lpt_jax.models.siglip_text) -> L2-normalised embeddings
      -> mean over templates, normalised again -> the head's column for that class

The columns live in the image-text space of the two-tower model, where the image tower's
pooled feature (the LPT feature of a SigLIP backbone) lives too, so before any training the
head is the zero-shot classifier. Used once at start-up: the tower's params go to the device
for this computation only and are dropped before training starts (only the (D, C) kernel, a
host array, is returned).

Tokenization is big_vision's `tokenize(max_len, eos='sticky', pad_value=...)`: lower-cased
text, the pieces' ids, the end token appended; too long -> cut to max_len - 1 and the end
token kept; short -> padded with `pad_id` (-1: the end token, SigLIP's pad_value=1 for the
c4_en vocabulary). The 'last' pooling then always reads an end token.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lpt_jax.config import fields as f
from lpt_jax.config.fields import INCIDENTAL, LOCATION, TRAINING, Accepts, Field, Section
from lpt_jax.errors import ConfigError, Setting
from lpt_jax.storage import files
from lpt_jax.text import tower as siglip_text

HEAD_INIT = Field("random", "the cosine head's start: 'random' (unit columns, spec §2), "
                  "'text' (class-name prompts through the two-tower model's text tower, "
                  "model.text; docs/siglip.md) or 'class_mean' (the normalised class means of "
                  "the frozen backbone's training features, LIFT's; lpt_jax.run.head_init)",
                  f.one_of("random", "text", "class_mean"), TRAINING)


def _one_slot(template) -> bool:
    """A prompt template with one '{}' for the class name and nothing else to fill."""
    try:
        return isinstance(template, str) and "{}" in template and bool(template.format("x"))
    except (IndexError, KeyError, ValueError):
        return False


def _templates():
    return Accepts(lambda v: not isinstance(v, str) and bool(v) and all(map(_one_slot, v)),
                   "a non-empty tuple of strings, each with '{}' where the class name goes, "
                   "e.g. ('a photo of a {}.',)")


def _tokenizer_exists(text_cfg, root) -> None:
    """With head_init='text' the tokenizer must be named and reachable (one line)."""
    if root is None or root.model.head_init != "text":
        return
    path = text_cfg.tokenizer
    if not path:
        raise ConfigError("model.head_init='text' needs ", Setting("model.text.tokenizer"),
                          ": the path of the text tower's SentencePiece model (SigLIP en: "
                          "gs://t5-data/vocabs/cc_en.32000/sentencepiece.model)",
                          field="model.text.tokenizer")
    try:
        found = files.exists(path)
    except OSError as e:  # e.g. RemoteError: gs:// without a network
        raise ConfigError(f"model.text.tokenizer={path!r}: cannot reach it ({e}); copy it once "
                          "and point the field at the local copy",
                          field="model.text.tokenizer") from None
    if not found:
        raise ConfigError(f"model.text.tokenizer={path!r}: no such file",
                          field="model.text.tokenizer")
    _check_tokenizer_file(path, "model.text.tokenizer")


MAX_TOKENIZER_BYTES = 256 << 20  # read whole into memory; a SentencePiece model is a few MiB


def _check_tokenizer_file(path: str, field: str) -> None:
    """One line if the tokenizer is not a file that can be read whole: a FIFO or a device
    (files.check_regular), or larger than MAX_TOKENIZER_BYTES."""
    try:
        files.check_regular(path)
        size = files.size(path)
    except FileNotFoundError:
        raise ConfigError(f"{field}={path!r}: no such file", field=field) from None
    except files.NotRegularFileError as e:
        raise ConfigError(f"{field}={path!r} is {e.strerror}", field=field) from None
    except OSError as e:
        raise ConfigError(f"{field}={path!r}: cannot read it ({e})", field=field) from None
    if size > MAX_TOKENIZER_BYTES:
        raise ConfigError(f"{field}={path!r} holds {size / 2**20:.1f} MiB, more than the "
                          f"{MAX_TOKENIZER_BYTES >> 20} MiB read for a SentencePiece model (a "
                          "few MiB): is this the tokenizer file?", field=field)


def _size(doc):
    return Field(None, doc + " (set by variant unless variant is None)", f.integer(at_least=1),
                 kind=int)


FIELDS = Section("the SigLIP text tower, read only for head_init='text' (lpt_jax.text.tower)",
                 dict(
    variant=Field("B", "big_vision's size name (B, L, So400m, ...): sets width, depth, mlp_dim, "
                  "num_heads; None: set them one by one", f.text(), kind=str),
    width=_size("token width"),
    depth=_size("number of blocks"),
    num_heads=_size("attention heads"),
    mlp_dim=_size("MLP hidden width"),
    vocab_size=Field(32_000, "token vocabulary", f.integer(at_least=1)),
    max_len=Field(64, "tokenized length", f.integer(
        at_least=2, note="a piece and the end token")),
    embed_dim=Field(None, "the image-text embedding width (None: the tower's width)",
                    f.integer(at_least=1), kind=int),
    pool_type=Field("last", "pooling of the text tokens ('last': the end token)",
                    f.one_of(*siglip_text.POOL_TYPES)),
    layernorm_epsilon=Field(1e-6, "LayerNorm epsilon (SigLIP: 1e-6)", f.number(above=0)),
    gelu_approximate=Field(True, "tanh GELU (SigLIP's)", f.boolean()),
    dtype=Field("float32", "compute dtype", f.one_of("float32", "bfloat16", "float16")),
    tokenizer=Field("", "the SentencePiece model of the text tower", f.text(), LOCATION),
    checkpoint=Field("", "the text tower's file ('' = the backbone's two-tower file)", f.text(),
                     LOCATION),
    subtree=Field("txt", "the tower in that file", f.text()),
    templates=Field(("a photo of a {}.",), "prompt templates, averaged ('{}' = the class name)",
                    _templates()),
    pad_id=Field(-1, "pad token id (-1: the end token, SigLIP's 'sticky' EOS)", f.integer()),
    lower=Field(True, "lower-case the prompts before tokenizing", f.boolean()),
    batch_size=Field(64, "prompts per text-tower batch", f.integer(at_least=1), INCIDENTAL)),
    rules=(_tokenizer_exists,), roles=frozenset({TRAINING}))


def load_tokenizer(path: str, field: str = "model.text.tokenizer"):
    """A SentencePiece processor from a `.model` file (local or gs://); one-line errors."""
    import sentencepiece  # only needed for head_init='text'

    if not path:
        raise ConfigError(f"{field} is empty: head_init='text' needs the SentencePiece model "
                          "of the text tower (SigLIP en: c4_en, "
                          "gs://t5-data/vocabs/cc_en.32000/sentencepiece.model)")
    _check_tokenizer_file(path, field)
    try:
        data = files.read_bytes(path)
    except FileNotFoundError:
        raise ConfigError(f"{field}={path!r}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{field}={path!r}: cannot read it ({e})") from None
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(data)
    except (RuntimeError, ValueError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{field}={path!r} is not a SentencePiece model ({msg})") from None
    if sp.eos_id() < 0:
        raise ConfigError(f"{field}={path!r} has no end-of-sentence token: the text tower "
                          "pools the end token")
    return sp


# big_vision lower-cases with tf.strings.lower, which changes the ASCII letters only
# ('ÉCLAIR' -> 'Éclair'); str.lower would change every Unicode letter.
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def tokenize(sp, texts: Sequence[str], max_len: int, *, pad_id: int = -1,
             lower: bool = True) -> np.ndarray:
    """int32 (N, max_len): big_vision's tokenize(eos='sticky', pad_value=pad_id)."""
    eos = sp.eos_id()
    pad = eos if pad_id < 0 else pad_id
    out = np.full((len(texts), max_len), pad, np.int32)
    for row, text in enumerate(texts):
        ids = list(sp.EncodeAsIds(text.translate(_ASCII_LOWER) if lower else text)) + [eos]
        if len(ids) > max_len:
            ids = ids[:max_len - 1] + [eos]
        out[row, :len(ids)] = ids
    return out


def readable(name: str) -> str:
    """A class name as words: 'airplane_cabin' -> 'airplane cabin', '/a/abbey' -> 'abbey'."""
    return " ".join(str(name).strip("/").split("/")[-1].replace("_", " ").split())


def prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Class-major prompts: C x T strings, `template.format(readable name)`."""
    return [t.format(readable(n)) for n in class_names for t in templates]


def embed(model, params, tokens: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Text embeddings (N, E) as a host array, in batches on the default device; the device
    copy of `params` lives only inside this call."""
    apply = jax.jit(lambda p, t: model.apply({"params": p}, t))
    device_params = jax.device_put(params)
    out = []
    for start in range(0, len(tokens), batch_size):
        chunk = tokens[start:start + batch_size]
        n = len(chunk)
        if n < batch_size and len(tokens) > batch_size:  # one compiled shape
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, 0)])
        out.append(np.asarray(apply(device_params, jnp.asarray(chunk)))[:n])
    del device_params
    return np.concatenate(out).astype(np.float32)


def unit(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """x / max(||x||, 1e-12), as lpt_jax.method.lpt_model.l2_normalize."""
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def head_kernel(embeddings: np.ndarray, num_classes: int) -> np.ndarray:
    """Class-major (C*T, E) embeddings -> (E, C) unit columns: each prompt's embedding
    normalised, averaged over the T templates, normalised again (CLIP's prompt ensemble)."""
    per_class = unit(embeddings).reshape(num_classes, -1, embeddings.shape[-1])
    return np.ascontiguousarray(unit(per_class.mean(axis=1)).T, np.float32)


def text_head_kernel(config, class_names: Sequence[str], feature_width: int) -> np.ndarray:
    """The (D, C) cosine-head kernel for `class_names` from config.model.text: its tokenizer,
    its tower (from model.text.checkpoint, or the backbone's two-tower file), its templates."""
    text = config.model.text
    sp = load_tokenizer(text.tokenizer)
    model = siglip_text.from_config(text)
    if model.out_dim != feature_width:
        raise ConfigError(
            f"the text tower embeds into {model.out_dim} dimensions but the image feature has "
            f"{feature_width}: model.text does not belong to this backbone")
    if sp.GetPieceSize() > model.vocab_size:
        raise ConfigError(f"model.text.tokenizer has {sp.GetPieceSize()} pieces but the text "
                          f"tower's vocabulary is {model.vocab_size} (model.text.vocab_size)")
    templates = tuple(text.templates)
    tokens = tokenize(sp, prompts(class_names, templates), model.max_len,
                      pad_id=text.pad_id, lower=text.lower)
    abstract = jax.eval_shape(model.init, jax.random.key(0), tokens[:1])["params"]
    path = text.checkpoint or config.backbone.checkpoint
    params = siglip_text.load_params(path, abstract, subtree=text.subtree)
    return head_kernel(embed(model, params, tokens, text.batch_size), len(class_names))
