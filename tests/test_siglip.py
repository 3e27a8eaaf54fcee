"""SigLIP towers: goldens from timm and open_clip (tools/make_siglip_goldens.py), an LPT run on a
tiny random two-tower file with a head initialised from class names (a SentencePiece model
trained here), and the one-line errors."""

import io
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpt_jax.backbones import vit_weights
from lpt_jax.backbones.vit import ViT
from lpt_jax.config import schema
from lpt_jax.errors import CheckpointError, ConfigError
from lpt_jax.run import exports, inference, trainer
from lpt_jax.text import head as text_head
from lpt_jax.text import tower as siglip_text
from lpt_jax.tree import flatten

from helpers import DATA, TINY_BLOCK
from tiny_run import tiny_config

GOLDEN = DATA / "siglip_tiny.npz"
META = json.loads((DATA / "siglip_tiny.json").read_text())


def _image_tower(gelu_approximate=True, pool_type="map", **kw):
    im = META["image"]
    size = (im["image_size"],) * 2
    return ViT(num_classes=None, image_size=size, patch_size=(im["patch_size"],) * 2,
               width=im["width"], depth=im["depth"], mlp_dim=im["mlp_dim"],
               num_heads=im["num_heads"], pool_type=pool_type,
               layernorm_epsilon=META["layernorm_epsilon"], gelu_approximate=gelu_approximate,
               **kw)


def _text_tower(gelu_approximate=True):
    tx = META["text"]
    return siglip_text.TextTransformer(
        vocab_size=tx["vocab_size"], max_len=tx["max_len"], width=tx["width"],
        depth=tx["depth"], mlp_dim=tx["mlp_dim"], num_heads=tx["num_heads"],
        embed_dim=META["embed_dim"], layernorm_epsilon=META["layernorm_epsilon"],
        gelu_approximate=gelu_approximate)


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(DATA / "siglip_tiny_golden.npz"))


def _image_features(model, golden, subtree="img"):
    init = jax.eval_shape(model.init, jax.random.key(0), golden["images"][:1])["params"]
    params = vit_weights.load_params(str(GOLDEN), init, subtree=subtree)
    with jax.default_matmul_precision("float32"):
        _, out = model.apply({"params": params}, golden["images"])
    return np.asarray(out["pre_logits"])


def _text_embeddings(model, golden):
    init = jax.eval_shape(model.init, jax.random.key(0), golden["tokens"][:1])["params"]
    params = siglip_text.load_params(str(GOLDEN), init)
    with jax.default_matmul_precision("float32"):
        return np.asarray(model.apply({"params": params}, golden["tokens"]))


# ------------------------------------------------------------------------------------------
# Goldens.

def test_image_tower_matches_timm_and_open_clip(golden):
    feats = _image_features(_image_tower(), golden)
    d_timm = np.abs(feats - golden["image_features_timm"]).max()
    d_oc = np.abs(feats - golden["image_features_open_clip"]).max()
    print(f"image features: max|d| timm {d_timm:.1e}, open_clip {d_oc:.1e} "
          f"(max|f| {np.abs(feats).max():.2f})")
    assert d_timm < 1e-5 and d_oc < 1e-5
    wrong = _image_features(_image_tower(gelu_approximate=False), golden)
    assert np.abs(wrong - golden["image_features_timm"]).max() > 1e-4  # the check can fail


def test_text_tower_matches_open_clip(golden):
    emb = _text_embeddings(_text_tower(), golden)
    d = np.abs(emb - golden["text_embeddings_open_clip"]).max()
    print(f"text embeddings: max|d| open_clip {d:.1e} (max|e| {np.abs(emb).max():.2f})")
    assert d < 1e-5
    wrong = _text_embeddings(_text_tower(gelu_approximate=False), golden)
    assert np.abs(wrong - golden["text_embeddings_open_clip"]).max() > 1e-4


# ------------------------------------------------------------------------------------------
# Strict loading.

def _one_line(err):
    text = str(err.value)
    assert "\n" not in text, text
    return text


def test_two_tower_file_needs_a_tower(golden):
    model = _image_tower()
    with pytest.raises(CheckpointError) as err:
        _image_features(model, golden, subtree="")
    assert "two-tower" in _one_line(err) and "config.backbone.subtree='img'" in _one_line(err)
    assert "--config.backbone.subtree=img" in err.value.text(cli=True)  # run.py's spelling
    with pytest.raises(CheckpointError) as err:
        _image_features(model, golden, subtree="image")
    assert "no subtree 'image'" in _one_line(err) and "['img', 'txt']" in str(err.value)


def test_pooling_mismatch_is_one_line(golden):
    with pytest.raises(CheckpointError) as err:  # a MAP checkpoint into a class-token model
        _image_features(_image_tower(pool_type="tok"), golden)
    assert "MAP head" in _one_line(err) and "pool_type='map'" in str(err.value)
    tok = ViT(num_classes=None, image_size=(32, 32), patch_size=(16, 16), width=64, depth=2,
              num_heads=4, mlp_dim=128, pool_type="map")
    init = jax.eval_shape(tok.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    with pytest.raises(CheckpointError) as err:  # a class-token checkpoint into a MAP model
        vit_weights.load_params(str(DATA / "vit_tiny_tok.npz"), init, ignore=("head/.*",))
    assert "class token" in _one_line(err) and "pool_type='tok'" in str(err.value)


# ------------------------------------------------------------------------------------------
# The tokenizer and the text-initialised head.

CLASS_WORDS = ("class 0", "class 1", "class 2", "class 3")
TEMPLATES = ("a photo of a {}.", "a blurry photo of the {}.")


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    """A tiny SentencePiece model trained here (T5/c4_en ids: pad 0, end 1, unknown 2)."""
    import sentencepiece
    lines = [t.format(w) for w in CLASS_WORDS for t in TEMPLATES] * 4
    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out, vocab_size=40, model_type="bpe",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, normalization_rule_name="identity",
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    path = tmp_path_factory.mktemp("spm") / "tiny.model"
    path.write_bytes(out.getvalue())
    return str(path)


def test_tokenize_is_big_vision_sticky_eos(tokenizer_path):
    sp = text_head.load_tokenizer(tokenizer_path)
    ids = sp.EncodeAsIds("a photo of a class 3.")
    eos = sp.eos_id()
    toks = text_head.tokenize(sp, ["A Photo of a CLASS 3.", "a photo of a class 3."],
                              len(ids) + 3)
    assert toks.tolist() == [ids + [eos] * 3] * 2  # lower-cased, end token, end-token padding
    short = text_head.tokenize(sp, ["a photo of a class 3."], 4, pad_id=0)
    assert short.tolist() == [ids[:3] + [eos]]      # cut, the end token kept
    assert text_head.readable("/a/airplane_cabin") == "airplane cabin"


def test_tokenize_lower_cases_as_big_vision_does(tmp_path):
    """big_vision lower-cases with tf.strings.lower: ASCII letters only. 'ÉCLAIR au CAFÉ'
    keeps its É (str.lower would make it é, other pieces, other text-head columns)."""
    import sentencepiece
    import tensorflow as tf
    words = ["Éclair", "éclair", "café", "cafÉ", "Ñandú", "ñandú", "grande", "Łódź", "łódź",
             "photo", "a", "of", "class", "au"]
    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(  # both cases of each accented letter in pieces
        sentence_iterator=iter([" ".join(words)] * 20), model_writer=out, vocab_size=60,
        model_type="char", character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        normalization_rule_name="identity", num_threads=1, minloglevel=2)
    (tmp_path / "accents.model").write_bytes(out.getvalue())
    sp = text_head.load_tokenizer(str(tmp_path / "accents.model"))
    assert sp.EncodeAsIds("É") != sp.EncodeAsIds("é")
    for text in ("ÉCLAIR au CAFÉ", "Ñandú GRANDE", "ŁÓDŹ Photo", "a photo of a CLASS 3."):
        lowered = tf.strings.lower(text).numpy().decode("utf-8")  # big_vision's (the oracle)
        want = sp.EncodeAsIds(lowered) + [sp.eos_id()]
        got = text_head.tokenize(sp, [text], len(want))[0].tolist()
        assert got == want, (text, lowered)
    assert tf.strings.lower("ÉCLAIR").numpy().decode() == "Éclair"  # what is at stake


def _random_two_tower(path, vit_kw, text_model):
    """A random SigLIP-layout two-tower file: params/img (MAP ViT), params/txt, t, b (values
    drawn in NumPy for the models' shapes: nothing to compile)."""
    rng = np.random.default_rng(3)
    size = vit_kw["image_size"]
    shapes = {
        "img": jax.eval_shape(ViT(num_classes=None, **vit_kw).init, jax.random.key(0),
                              jnp.zeros((1,) + size + (3,)))["params"],
        "txt": jax.eval_shape(text_model.init, jax.random.key(0),
                              jnp.zeros((1, text_model.max_len), jnp.int32))["params"]}
    arrays = {"params/t": np.zeros(1, np.float32), "params/b": np.zeros(1, np.float32)}
    for tower, tree in shapes.items():
        for k, leaf in flatten(tree).items():
            std = 0.3 if k.endswith("bias") or "embedding" in k or "probe" in k else \
                np.prod(leaf.shape[:-1]) ** -0.5
            value = (1.0 if k.endswith("scale") else 0.0) + std * rng.standard_normal(leaf.shape)
            arrays[f"params/{tower}/{k}"] = value.astype(np.float32)
    np.savez(path, **arrays)
    return str(path)


TEXT_TINY = dict(variant=None, width=24, depth=1, num_heads=2, mlp_dim=48, vocab_size=64,
                 max_len=16, embed_dim=TINY_BLOCK["width"])


def _siglip_run_config(tmp, tokenizer_path):
    """The tiny LPT run on a random SigLIP-layout two-tower file, head_init='text'."""
    vit_kw = dict(image_size=(32, 32), patch_size=(8, 8), width=TINY_BLOCK["width"], depth=2,
                  num_heads=TINY_BLOCK["num_heads"], mlp_dim=TINY_BLOCK["mlp_dim"],
                  pool_type="map")
    # Written where tiny_config looks for its backbone, so it makes none of its own.
    ckpt = _random_two_tower(tmp / "vit.npz", vit_kw, siglip_text.from_config(TEXT_TINY))
    config = tiny_config(tmp, epochs=1, batch_size=8)
    config.model.vit.update(dict(depth=2, pool_type="map", layernorm_epsilon=1e-6,
                                 gelu_approximate=True))
    config.model.lpt.shared_depth = 1
    config.model.text.update(dict(TEXT_TINY, tokenizer=tokenizer_path, templates=TEMPLATES))
    config.model.head_init = "text"
    config.backbone.checkpoint = ckpt
    config.backbone.subtree = "img"
    config.train.max_steps = 2   # both in the warm-up epoch (lr 1e-6): the head barely moves
    config.train.num_devices = 1  # the multi-device paths are test_train's
    config.eval.plot = False
    shutil.rmtree(tmp / "data" / "val")  # one evaluation (test) instead of three: less to compile
    return config


@pytest.fixture(scope="module")
def siglip_run_config(tmp_path_factory, tokenizer_path):
    return _siglip_run_config(tmp_path_factory.mktemp("siglip_run"), tokenizer_path)


def _expected_text_head(config, class_names):
    """Each prompt through the text tower, normalised, averaged per class, normalised."""
    model = siglip_text.from_config(config.model.text)
    init = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, model.max_len), jnp.int32))["params"]
    params = siglip_text.load_params(config.backbone.checkpoint, init)
    sp = text_head.load_tokenizer(config.model.text.tokenizer)
    names = [n.replace("_", " ") for n in class_names]
    toks = text_head.tokenize(sp, [t.format(n) for n in names for t in TEMPLATES],
                              model.max_len)
    emb = np.asarray(model.apply({"params": params}, toks)).reshape(len(names), len(TEMPLATES), -1)
    emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    mean = emb.mean(1)
    return (mean / np.linalg.norm(mean, axis=-1, keepdims=True)).T


def test_lpt_runs_both_phases_on_a_siglip_tower_with_a_text_head(siglip_run_config, tmp_path,
                                                                 monkeypatch):
    config = siglip_run_config
    report = trainer.train(config, str(tmp_path / "wd"))
    assert 0.0 <= report["overall"] <= 100.0
    assert (tmp_path / "wd" / "phase2" / "export.npz").exists()
    # Phase 1 started from the text head: 2 warm-up steps at lr 1e-6 leave it in place.
    trained, _ = exports.read(str(tmp_path / "wd" / "phase1" / "export.npz"))
    kernel = np.asarray(trained["head"]["kernel"])
    expected = _expected_text_head(config, [f"class_{c}" for c in range(4)])
    assert kernel.shape == expected.shape == (TINY_BLOCK["width"], 4)
    np.testing.assert_allclose(kernel, expected, atol=1e-4)
    assert np.abs(expected[:, 0] - expected[:, 1]).max() > 1e-2  # the classes differ
    # The text tower did not stay on the devices: no array has its token embedding's shape.
    text_shape = (TEXT_TINY["vocab_size"], TEXT_TINY["width"])
    assert not [a for a in jax.live_arrays() if a.shape == text_shape]

    # Evaluating the run takes the head from the export: the text tower is not run again.
    def not_again(*args, **kwargs):
        raise AssertionError("the text tower ran for an evaluation")
    monkeypatch.setattr(text_head, "text_head_kernel", not_again)
    assert inference.evaluate_workdir(config, str(tmp_path / "wd"))["overall"] == report["overall"]



def test_text_head_errors_are_one_line(siglip_run_config, tmp_path):
    fifo = tmp_path / "pipe.model"
    os.mkfifo(fifo)  # read whole, it would block forever: refused by the config check
    huge = tmp_path / "huge.model"
    with open(huge, "wb") as f:  # sparse
        f.truncate(text_head.MAX_TOKENIZER_BYTES + 1)
    cases = [
        (dict(tokenizer=""), "needs config.model.text.tokenizer"),
        (dict(tokenizer=str(tmp_path / "nope.model")), "no such file"),
        (dict(tokenizer=str(fifo)), f"model.text.tokenizer={str(fifo)!r} is a FIFO (named pipe)"),
        (dict(tokenizer=str(huge)), "more than the 256 MiB read for a SentencePiece model"),
        (dict(templates=("a photo of a class.",)), "model.text.templates="),
        (dict(max_len=1), "model.text.max_len=1"),
    ]
    for change, says in cases:
        config = siglip_run_config.copy_and_resolve_references()
        config.model.text.update(change)
        with pytest.raises(ConfigError) as err:
            schema.check(config)
        assert says in _one_line(err)
    config = siglip_run_config.copy_and_resolve_references()
    config.model.head_init = "clip"
    with pytest.raises(ConfigError, match="model.head_init='clip'"):
        schema.check(config)
    config = siglip_run_config.copy_and_resolve_references()
    config.model.vit.pool_type = "cls"
    with pytest.raises(ConfigError, match="model.vit.pool_type='cls'"):
        schema.check(config)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ConfigError) as err:
        text_head.load_tokenizer(str(bad))
    assert "is not a SentencePiece model" in _one_line(err)
    config = siglip_run_config.copy_and_resolve_references()
    config.model.text.embed_dim = 16  # a text tower of another model
    with pytest.raises(ConfigError) as err:
        text_head.text_head_kernel(config, ["a", "b"], 32)
    assert "embeds into 16 dimensions" in _one_line(err)


# ------------------------------------------------------------------------------------------
# Sizes and configs.

def test_so400m_shape_and_config():
    from lpt_jax.backbones.vit import decode_variant

    from helpers import CONFIGS, load_config
    assert decode_variant("So400m/14") == dict(width=1152, depth=27, mlp_dim=4304,
                                               num_heads=16, patch_size=(14, 14))
    # big_vision's VALID patch conv: 384 px at patch 14 is a 27 x 27 grid (6 px unused).
    assert ViT(image_size=(384, 384), patch_size=(14, 14)).grid == (27, 27)
    config = load_config(CONFIGS / "places_lt.py", "siglip_so400m")
    vit = config.model.vit
    assert (vit.variant, vit.pool_type, vit.image_size, vit.layernorm_epsilon,
            vit.gelu_approximate) == ("So400m/14", "map", 224, 1e-6, True)
    assert (config.backbone.subtree, config.model.lpt.shared_depth, config.data.image_size,
            config.model.text.variant, config.model.text.max_len) == ("img", 13, 224,
                                                                       "So400m", 16)
    schema.check(config)
    with pytest.raises(ConfigError, match="expected no argument, .lift., one of"):
        load_config(CONFIGS / "places_lt.py", "siglip_huge")
