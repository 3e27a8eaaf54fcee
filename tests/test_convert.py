"""lpt_jax.convert: the PyTorch LPT release and timm / Hugging Face ViT files, against torch.

Fixtures and goldens come from tools/make_convert_fixtures.py (torch + timm + safetensors in
the oracle venv): a tiny release checkpoint saved as the release's training script saves it
(`module.` keys) and plain, its phase-2 outputs computed in torch, a timm ViT as
.safetensors (fp32, bf16) and .bin with timm's outputs, and a pickle that calls os.mkdir.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from lpt_jax import convert
from lpt_jax.backbones import vit_weights
from lpt_jax.backbones.vit import ViT, vit_from_config
from lpt_jax.convert import __main__ as convert_cli
from lpt_jax.convert.release import PLACES_RELEASE
from lpt_jax.errors import CheckpointError, UnsafeCheckpointError
from lpt_jax.method.lpt_model import LPT, lpt_from_config
from lpt_jax.run import exports
from lpt_jax.tree import flatten

from helpers import DATA

FIX = DATA / "convert"
RELEASE = json.loads((FIX / "release.json").read_text())
TIMM = json.loads((FIX / "timm_vit.json").read_text())
HEADS = str(RELEASE["num_heads"])  # width 32 is no standard size


def run_phase2(model, params, images):
    with jax.default_matmul_precision("float32"):
        fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=LPT.phase2))
        return jax.tree.map(np.asarray, fn(params, images))


def assert_matches_oracle(out, golden):
    d_logits = np.abs(out["logits"] - golden["logits"]).max()
    d_query = np.abs(out["query"] - golden["query"]).max()
    d_match = abs(float(out["match"]) - float(golden["match"]))
    print(f"max|d logits|={d_logits:.1e} max|d query|={d_query:.1e} |d match|={d_match:.1e}")
    np.testing.assert_array_equal(out["indices"], golden["indices"])
    assert d_logits < 1e-5 and d_query < 1e-5 and d_match < 1e-5


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(FIX / "release_golden.npz"))


@pytest.fixture(scope="module")
def release(golden):
    model, params = convert.load_release(str(FIX / "release_module.pth"),
                                         num_heads=RELEASE["num_heads"])
    return model, params


def test_release_outputs_equal_the_torch_oracle(release, golden):
    model, params = release
    assert len({tuple(r) for r in golden["indices"]}) > 1  # images pick different entries
    assert_matches_oracle(run_phase2(model, params, golden["images"]), golden)
    # The numerics the release uses are what make it match: eps 1e-6 moves the logits.
    wrong = model.clone(backbone=model.backbone.clone(layernorm_epsilon=1e-6))
    out = run_phase2(wrong, params, golden["images"])
    assert np.abs(out["logits"] - golden["logits"]).max() > 1e-4


def test_plain_and_module_prefixed_state_dicts_give_the_same_model(release):
    model, params = release
    model2, params2 = convert.load_release(str(FIX / "release_plain.pth"), num_heads=2)
    assert model2 == model
    a, b = flatten(params), flatten(params2)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    r = convert.read_release(str(FIX / "release_plain.pth"), num_heads=2)
    assert r.shapes() == dict(width=32, depth=3, num_heads=2, mlp_dim=64, patch_size=8,
                              image_size=24, prompt_length=3, pool_size=5, shared_depth=1,
                              top_k=2, num_classes=6)


def _cli(capsys, *argv):
    code = convert_cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_release_command_writes_backbone_and_export_that_eval_loads(tmp_path, capsys, golden,
                                                                     release):
    out_dir = tmp_path / "converted"
    code, out, err = _cli(capsys, "release", f"--checkpoint={FIX / 'release_module.pth'}",
                          f"--out={out_dir}", f"--num_heads={HEADS}",
                          f"--class_names={FIX / 'release_classnames.txt'}")
    assert code == 0, err
    assert "--config.model.vit.num_heads=2" in out and "--config.model.lpt.shared_depth=1" in out
    trained, meta = exports.read(str(out_dir / "export.npz"))
    assert meta["phase"] == 2 and meta["class_names"] == RELEASE["class_names"]
    vit_cfg = meta["config"]["model"]["vit"]
    assert vit_cfg["layernorm_epsilon"] == 1e-5 and vit_cfg["gelu_approximate"] is False
    assert meta["config"]["data"] == {"image_size": 24, "resize_size": 27}

    # What run.py --mode=eval does: build the model from configs/places_lt.py plus the
    # printed overrides, load backbone.npz strictly and put the export in.
    config = _places_config(meta["eval_settings"])
    model = lpt_from_config(config.model, RELEASE["num_classes"])
    assert model == release[0]
    abstract = jax.eval_shape(model.init, jax.random.key(0), golden["images"][:1])["params"]
    params = dict(abstract)
    params["backbone"] = vit_weights.load_params(
        str(out_dir / "backbone.npz"), abstract["backbone"], ignore=config.backbone.ignore,
        grid=model.backbone.grid)
    params, _ = exports.apply(params, str(out_dir / "export.npz"),
                              class_names=RELEASE["class_names"],
                              config=config)  # as inference.load_trained
    assert_matches_oracle(run_phase2(model, params, golden["images"]), golden)

    # Existing outputs are not replaced unless asked.
    before = (out_dir / "export.npz").stat().st_mtime_ns
    code, out, err = _cli(capsys, "release", f"--checkpoint={FIX / 'release_module.pth'}",
                          f"--out={out_dir}", f"--num_heads={HEADS}", "--class_names=none")
    assert code == 1 and err.count("\n") == 1 and "--overwrite" in err
    assert (out_dir / "export.npz").stat().st_mtime_ns == before


def _places_config(settings):
    """configs/places_lt.py with {field: value} set (as run.py's --config.a.b=v would)."""
    from configs.places_lt import get_config
    config = get_config()
    for path, value in settings.items():
        *parents, leaf = path.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def test_places_config_is_the_published_release():
    """LPT_places.pth needs no overrides: configs/places_lt.py builds its model."""
    config = _places_config({})
    vit = vit_from_config(config.model.vit)
    assert (vit.width, vit.depth, vit.num_heads, vit.mlp_dim, vit.patch_size[0],
            vit.image_size[0]) == tuple(PLACES_RELEASE[k] for k in (
                "width", "depth", "num_heads", "mlp_dim", "patch_size", "image_size"))
    assert (vit.layernorm_epsilon, vit.gelu_approximate, vit.pool_type) == (1e-5, False, "tok")
    lpt = config.model.lpt
    assert (lpt.prompt_length, lpt.pool_size, lpt.shared_depth, lpt.top_k) == tuple(
        PLACES_RELEASE[k] for k in ("prompt_length", "pool_size", "shared_depth", "top_k"))
    assert (config.data.image_size, config.data.resize_size) == (224, 256)  # 224 * 8 // 7


def test_places_class_names_are_the_data_sources():
    from lpt_jax.convert.writing import SHIPPED_CLASS_NAMES, read_class_names
    from lpt_jax.data import split_lists
    names = read_class_names("places_lt", 365)
    assert names == split_lists.read_class_names(SHIPPED_CLASS_NAMES["places_lt"])
    with pytest.raises(CheckpointError, match="365 names, but the checkpoint's head has 6"):
        read_class_names("places_lt", 6)


# ------------------------------------------------------------------------------------------
# timm / Hugging Face ViT files as backbones.

@pytest.fixture(scope="module")
def timm_vit():
    model = ViT(num_classes=TIMM["num_classes"], image_size=(TIMM["image_size"],) * 2,
                patch_size=(TIMM["patch_size"],) * 2, width=TIMM["width"], depth=TIMM["depth"],
                num_heads=TIMM["num_heads"], mlp_dim=TIMM["mlp_dim"],
                layernorm_epsilon=TIMM["layernorm_epsilon"])
    golden = np.load(FIX / "timm_vit_golden.npz")
    abstract = jax.eval_shape(model.init, jax.random.key(0), golden["images"][:1])["params"]
    return model, abstract, golden


@pytest.mark.parametrize("name", ["timm_vit.safetensors", "timm_vit.bin"])
def test_timm_files_load_as_backbones_and_match_timm(timm_vit, name):
    model, abstract, golden = timm_vit
    params = vit_weights.load_params(str(FIX / name), abstract)
    with jax.default_matmul_precision("float32"):
        logits, out = jax.jit(model.apply)({"params": params}, golden["images"])
    d_logits = np.abs(np.asarray(logits) - golden["logits"]).max()
    d_feat = np.abs(np.asarray(out["pre_logits"]) - golden["features"]).max()
    print(f"{name}: max|d logits|={d_logits:.1e} max|d features|={d_feat:.1e}")
    assert d_logits < 1e-5 and d_feat < 1e-5


def test_bf16_safetensors_are_widened_exactly():
    import ml_dtypes
    fp32 = convert.read_state_dict(str(FIX / "timm_vit.safetensors"))
    bf16 = convert.read_state_dict(str(FIX / "timm_vit_bf16.safetensors"))
    assert sorted(fp32) == sorted(bf16)
    for k, v in fp32.items():
        assert bf16[k].dtype == np.float32
        np.testing.assert_array_equal(bf16[k], v.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_backbone_command_round_trips_to_big_vision_npz(timm_vit, tmp_path, capsys):
    _, abstract, _ = timm_vit
    out = tmp_path / "vit.npz"
    code, stdout, err = _cli(capsys, "backbone", f"--checkpoint={FIX / 'timm_vit.bin'}",
                             f"--out={out}", "--num_heads=4")
    assert code == 0, err
    assert "32 wide, 2 blocks, 4 heads" in stdout and "head 5" in stdout
    direct = flatten(vit_weights.load_params(str(FIX / "timm_vit.safetensors"), abstract))
    again = flatten(vit_weights.load_params(str(out), abstract))
    assert sorted(direct) == sorted(again)
    for k in direct:
        np.testing.assert_array_equal(again[k], direct[k], err_msg=k)


# ------------------------------------------------------------------------------------------
# What is refused, each as one line.

def test_a_malicious_pickle_is_refused_without_running_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # where os.mkdir('lpt_jax_pwned') would land
    with pytest.raises(UnsafeCheckpointError, match="posix.mkdir"):
        convert.read_state_dict(str(FIX / "malicious.pth"))
    code, _, err = _cli(capsys, "backbone", f"--checkpoint={FIX / 'malicious.pth'}",
                        f"--out={tmp_path / 'x.npz'}")
    assert code == 1 and err.count("\n") == 1 and "refused without running it" in err
    assert not os.path.exists(tmp_path / "lpt_jax_pwned")
    assert os.listdir(tmp_path) == []  # and nothing written


def _one_line_error(fn, match):
    with pytest.raises(CheckpointError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_files_are_one_clear_line(tmp_path, timm_vit):
    _, abstract, _ = timm_vit
    rel = str(FIX / "release_module.pth")
    _one_line_error(lambda: convert.load_release(rel), "pass --num_heads")
    _one_line_error(lambda: convert.load_release(str(FIX / "timm_vit.bin")),
                    "not an LPT release checkpoint: it has no prompt_learner.Prompt_Tokens")
    # A release given as a ViT: the strict report names its prompt_learner entries.
    _one_line_error(lambda: convert.convert_backbone(rel, str(tmp_path / "x.npz"),
                                                     num_heads=2),
                    r"unexpected \(4\): prompt_learner.Prompt_Keys")
    assert not (tmp_path / "x.npz").exists()
    for name, cut in (("timm_vit.safetensors", 5000), ("timm_vit.bin", 5000)):
        bad = tmp_path / name
        bad.write_bytes((FIX / name).read_bytes()[:-cut])
        _one_line_error(lambda: vit_weights.load_params(str(bad), abstract), str(bad))
    legacy = tmp_path / "old.pth"
    legacy.write_bytes(b"\x80\x02}q\x00.")
    _one_line_error(lambda: convert.read_state_dict(str(legacy)), "legacy serialization")
    npz = tmp_path / "not_torch.pth"
    shutil.copy(DATA / "vit_tiny_tok.npz", npz)
    _one_line_error(lambda: convert.read_state_dict(str(npz)), "not one written by torch.save")


def test_a_failed_release_convert_leaves_neither_output(tmp_path, capsys, monkeypatch):
    """The pair is written under temporary names and renamed together: a disk that fills while
    the export is written leaves no backbone.npz without its export (and no .partial), and a
    rerun needs no --overwrite."""
    from lpt_jax.convert import writing
    real_write = writing.exports.write

    def full_disk(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half an export")
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(writing.exports, "write", full_disk)
    out_dir = tmp_path / "converted"
    argv = ["release", f"--checkpoint={FIX / 'release_module.pth'}", f"--out={out_dir}",
            f"--num_heads={HEADS}", "--class_names=none"]
    code, out, err = _cli(capsys, *argv)
    assert code == 1 and err.count("\n") == 1 and "No space left" in err, err
    assert sorted(os.listdir(out_dir)) == []

    monkeypatch.setattr(writing.exports, "write", real_write)
    code, out, err = _cli(capsys, *argv)
    assert code == 0, err
    assert sorted(os.listdir(out_dir)) == ["backbone.npz", "export.npz"]
    _, meta = exports.read(str(out_dir / "export.npz"))
    assert meta["backbone"]["path"] == str(out_dir / "backbone.npz")
    assert meta["backbone"]["size"] == (out_dir / "backbone.npz").stat().st_size
