"""Checkpoint loading: both layouts, scan layout, bf16, posemb resampling, and clear errors."""

import io
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from lpt_jax.backbones import vit_weights
from lpt_jax.backbones.vit import ViT
from lpt_jax.errors import CheckpointError
from lpt_jax.tree import flatten, unflatten
from lpt_jax.weights import npz


def _vit(**kw):
    args = dict(num_classes=5, image_size=(32, 32), patch_size=(8, 8), width=16, depth=2,
                num_heads=2, mlp_dim=32)
    args.update(kw)
    return ViT(**args)


def _params(model, seed=0):
    x = jnp.zeros((1,) + tuple(model.image_size) + (3,))
    p = model.init(jax.random.key(seed), x)["params"]
    # Random everywhere (init has zeros in cls/head) so a wrong mapping changes outputs.
    leaves, treedef = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(treedef, [np.asarray(0.3 * jax.random.normal(k, l.shape))
                                        for k, l in zip(keys, leaves)])


def _to_vit_jax_layout(params):
    """Writes big_vision params in the old vit_jax/AugReg names (independent of the loader)."""
    flat = {k: np.asarray(v) for k, v in flatten(params).items()}
    out = {}
    for k, v in flat.items():
        k = (k.replace("MultiHeadDotProductAttention_0", "MultiHeadDotProductAttention_1")
              .replace("LayerNorm_1", "LayerNorm_2").replace("MlpBlock_0", "MlpBlock_3"))
        out[k] = v
    pos = out.pop("pos_embedding")
    if "cls" in out:
        # vit_jax stores a CLS position row and adds it to the token: split cls arbitrarily.
        row = np.full_like(out["cls"], 0.25)
        out["cls"] = out["cls"] - row
        pos = np.concatenate([row, pos], axis=1)
    out["Transformer/posembed_input/pos_embedding"] = pos
    return out


def _save(path, arrays):
    np.savez(path, **arrays)
    return str(path)


def _same(a, b):
    fa, fb = flatten(a), flatten(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_allclose(np.asarray(fa[k]), np.asarray(fb[k]), rtol=0, atol=1e-6,
                                   err_msg=k)


@pytest.mark.parametrize("pool_type", ["tok", "gap"])
def test_layouts_load_to_identical_params(tmp_path, pool_type):
    model = _vit(pool_type=pool_type)
    ref = _params(model)
    init = _params(model, seed=7)
    bv = vit_weights.load_params(_save(tmp_path / "bv.npz", flatten(ref)), init)
    _same(bv, ref)
    prefixed = {f"params/{k}": v for k, v in flatten(ref).items()}
    _same(vit_weights.load_params(_save(tmp_path / "pre.npz", prefixed), init), ref)
    vit_weights.save_big_vision_npz(str(tmp_path / "scan.npz"), ref, scan=True)
    with np.load(tmp_path / "scan.npz") as z:
        assert "Transformer/encoderblock/LayerNorm_0/scale" in z.files
        assert z["Transformer/encoderblock/LayerNorm_0/scale"].shape == (2, 16)
    _same(vit_weights.load_params(str(tmp_path / "scan.npz"), init), ref)
    old = vit_weights.load_params(_save(tmp_path / "old.npz", _to_vit_jax_layout(ref)), init)
    _same(old, ref)


def test_vit_jax_layout_gives_same_outputs(tmp_path):
    model = _vit()
    ref = _params(model)
    loaded = vit_weights.load_params(_save(tmp_path / "old.npz", _to_vit_jax_layout(ref)),
                                  _params(model, 3))
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
    a, _ = model.apply({"params": ref}, x)
    b, _ = model.apply({"params": loaded}, x)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_bf16_saved_as_void(tmp_path):
    model = _vit()
    ref = _params(model)
    flat = {k: np.asarray(jnp.asarray(v, jnp.bfloat16)) for k, v in flatten(ref).items()}
    np.savez(tmp_path / "bf16.npz", **flat)
    with np.load(tmp_path / "bf16.npz") as z:  # what numpy makes of bfloat16 on disk
        assert z["cls"].dtype.kind == "V" and z["cls"].dtype.itemsize == 2
    loaded = vit_weights.load_params(str(tmp_path / "bf16.npz"), _params(model, 1))
    for k, v in flatten(loaded).items():
        want = np.asarray(jnp.asarray(flatten(ref)[k], jnp.bfloat16).astype(jnp.float32))
        np.testing.assert_array_equal(v, want, err_msg=k)


@pytest.mark.parametrize("old,new", [(4, 6), (7, 3), (2, 5), (5, 5)])
def test_posemb_resampling_matches_scipy_zoom(old, new):
    rng = np.random.default_rng(0)
    posemb = rng.normal(size=(1, old * old, 3)).astype(np.float32)
    got = vit_weights.resample_posemb(posemb, (new, new))
    grid = posemb.reshape(old, old, 3)
    want = scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1).reshape(1, -1, 3)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_loading_resamples_to_model_grid(tmp_path):
    small, big = _vit(image_size=(32, 32)), _vit(image_size=(48, 48))
    ref = _params(small)
    loaded = vit_weights.load_params(_save(tmp_path / "c.npz", flatten(ref)), _params(big))
    assert loaded["pos_embedding"].shape == (1, 36, 16)
    want = scipy.ndimage.zoom(np.asarray(ref["pos_embedding"]).reshape(4, 4, 16),
                              (1.5, 1.5, 1), order=1).reshape(1, 36, 16)
    np.testing.assert_allclose(loaded["pos_embedding"], want, atol=1e-5)


def test_dont_load_and_ignore(tmp_path):
    with_head, headless = _vit(), _vit(num_classes=None)
    ref = _params(with_head)
    path = _save(tmp_path / "c.npz", flatten(ref))
    with pytest.raises(CheckpointError, match=r"unexpected.*head/bias \(5,\).*head/kernel"):
        vit_weights.load_params(path, _params(headless))
    loaded = vit_weights.load_params(path, _params(headless), ignore=[r"head/.*"])
    assert "head" not in loaded
    init = _params(_vit(num_classes=9), seed=4)
    kept = vit_weights.load_params(path, init, dont_load=[r"head/.*"])
    np.testing.assert_array_equal(kept["head"]["kernel"], init["head"]["kernel"])
    np.testing.assert_array_equal(kept["cls"], ref["cls"])


def test_strict_check_lists_every_problem(tmp_path):
    model = _vit()
    flat = {k: np.asarray(v) for k, v in flatten(_params(model)).items()}
    del flat["Transformer/encoder_norm/scale"]
    flat["Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"] = np.zeros((16, 33))
    flat["extra/thing"] = np.zeros((2, 2))
    with pytest.raises(CheckpointError) as err:
        vit_weights.load_params(_save(tmp_path / "bad.npz", flat), _params(model))
    msg = str(err.value)
    assert "missing from checkpoint (1): Transformer/encoder_norm/scale (16,)" in msg
    assert "MlpBlock_0/Dense_0/kernel: checkpoint (16, 33) vs model (16, 32)" in msg
    assert "extra/thing (2, 2)" in msg


def test_checkpoint_of_another_size(tmp_path):
    path = _save(tmp_path / "wide.npz", flatten(_params(_vit(width=24, num_heads=2))))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        vit_weights.load_params(path, _params(_vit()))


@pytest.mark.parametrize("case", ["missing", "truncated", "text", "pickle", "plain_npy"])
def test_unreadable_files_give_one_line_errors(tmp_path, case):
    model = _vit()
    path = tmp_path / "ckpt.npz"
    if case == "truncated":
        _save(path, flatten(_params(model)))
        path.write_bytes(path.read_bytes()[:2000])
    elif case == "text":
        path.write_text("this is not a checkpoint\n")
    elif case == "pickle":
        np.save(tmp_path / "ckpt.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
        path = tmp_path / "ckpt.npy"
    elif case == "plain_npy":
        np.save(tmp_path / "ckpt.npy", np.zeros(3))
        path = tmp_path / "ckpt.npy"
    with pytest.raises(CheckpointError) as err:
        vit_weights.load_params(str(path), _params(model))
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg


def test_structured_npy_loads(tmp_path):
    model = _vit()
    ref = {k: np.asarray(v) for k, v in flatten(_params(model)).items()}
    dtype = np.dtype([(k, v.dtype, v.shape) for k, v in ref.items()])
    record = np.zeros((), dtype)
    for k, v in ref.items():
        record[k] = v
    np.save(tmp_path / "c.npy", record)
    _same(vit_weights.load_params(str(tmp_path / "c.npy"), _params(model, 2)),
          unflatten(ref))


def test_other_url_schemes_are_read_through_fsspec():
    """Other schemes than gs:// (here fsspec's in-memory `memory://`) are read through fsspec;
    gs:// goes through lpt_jax.storage.gcs (tests/test_gcs.py, against an emulator)."""
    import fsspec
    model = _vit()
    ref = _params(model)
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in flatten(ref).items()})
    path = f"memory://ckpts-{os.getpid()}/vit.npz"
    fsspec.filesystem("memory").pipe_file(path, buf.getvalue())
    _same(vit_weights.load_params(path, _params(model, 5)), ref)
    with pytest.raises(CheckpointError, match="not found: memory://ckpts/nope.npz"):
        vit_weights.load_params("memory://ckpts/nope.npz", _params(model))
    assert zipfile.is_zipfile(io.BytesIO(buf.getvalue()))


def test_representation_layer(tmp_path):
    """pre_logits loads from the checkpoint and is tanh(Dense) on the pooled feature."""
    with_rep = _vit(representation_size=12)
    ref = _params(with_rep)
    assert ref["pre_logits"]["kernel"].shape == (16, 12) and ref["head"]["kernel"].shape == (12, 5)
    loaded = vit_weights.load_params(_save(tmp_path / "rep.npz", flatten(ref)), _params(with_rep, 3))
    x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
    logits, out = with_rep.apply({"params": loaded}, x)
    tokens = with_rep.apply({"params": loaded}, x, method=with_rep.embed)
    encoded = with_rep.apply({"params": loaded}, tokens, method=with_rep.encode)
    normed = with_rep.apply({"params": loaded}, encoded,
                            method=lambda m, t: m.Transformer.norm(t))[:, 0]
    pre = np.tanh(np.asarray(normed) @ ref["pre_logits"]["kernel"] + ref["pre_logits"]["bias"])
    np.testing.assert_allclose(out["pre_logits"], pre, atol=1e-5)
    np.testing.assert_allclose(logits, pre @ ref["head"]["kernel"] + ref["head"]["bias"], atol=1e-5)
    with pytest.raises(CheckpointError, match="missing from checkpoint.*pre_logits/kernel"):
        vit_weights.load_params(_save(tmp_path / "norep.npz", flatten(_params(_vit()))),
                             _params(with_rep))


def test_vit_backbone_module_resamples_to_the_model_grid(tmp_path):
    """`backbones.get('vit').load_params` is vit_weights.load_params with the model's grid."""
    from lpt_jax import backbones
    vit = backbones.get("vit")
    small, wide = _vit(image_size=(32, 32)), _vit(image_size=(32, 48))  # 4x4 -> 4x6 grid
    ref = _params(small)
    path = _save(tmp_path / "c.npz", flatten(ref))
    loaded = vit.load_params(path, _params(wide, 3), dont_load=(), ignore=(), model=wide)
    want = scipy.ndimage.zoom(np.asarray(ref["pos_embedding"]).reshape(4, 4, 16),
                              (1, 1.5, 1), order=1).reshape(1, 24, 16)
    np.testing.assert_allclose(loaded["pos_embedding"], want, atol=1e-6)
    assert vit.from_config(dict(variant="Ti/16", image_size=224)).width == 192


@pytest.mark.parametrize("size", [0, 1000, 1 << 20, (1 << 20) + 7, 3 << 20, 17 << 20])
def test_file_fingerprint_hashes_the_whole_file_and_its_head_and_tail(tmp_path, size):
    import hashlib
    data = np.random.default_rng(size).bytes(size)
    path = tmp_path / "f.npz"
    path.write_bytes(data)
    mib = 1 << 20
    tail = data[-mib:] if size > 2 * mib else data[mib:]
    want = hashlib.sha256(data[:mib] + tail).hexdigest()
    assert npz.file_fingerprint(str(path)) == {
        "path": str(path), "size": size, "sha256": hashlib.sha256(data).hexdigest(),
        "sha256_head_tail": want}
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        npz.file_fingerprint(str(tmp_path / "nope.npz"))


def test_a_backbone_changed_only_in_its_middle_is_another_backbone(tmp_path):
    """The identity covers the whole file: a .safetensors / .pth / .npz changed only in the
    middle (its first and last MiB as before) no longer passes for the file an export was
    trained on; an export that recorded only the head-and-tail hash (written before) is
    still judged by it."""
    from lpt_jax.errors import ExportError
    from lpt_jax.run import exports
    data = bytearray(np.random.default_rng(0).bytes(5 << 20))
    path = tmp_path / "vit.safetensors"
    path.write_bytes(bytes(data))
    trained_on = npz.file_fingerprint(str(path))
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    now = npz.file_fingerprint(str(path))
    assert now["sha256_head_tail"] == trained_on["sha256_head_tail"]
    assert now["sha256"] != trained_on["sha256"]
    with pytest.raises(ExportError, match="was trained on another backbone"):
        exports.check_backbone("export.npz", trained_on, str(path), now)
    old_export = {k: v for k, v in trained_on.items() if k != "sha256"}
    exports.check_backbone("export.npz", old_export, str(path), now)  # judged by what it has
