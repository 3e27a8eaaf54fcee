"""NaN or inf weights are one line before anything is written: a backbone file with a NaN
weight is refused by training, evaluation and prediction (they load through the same check,
as serving does), and by `lpt_jax.convert`; a learning rate that turns the first step
non-finite says that no checkpoint exists yet, and cites only a checkpoint that exists."""

import json
import struct

import numpy as np
import pytest

from lpt_jax import convert
from lpt_jax.errors import CheckpointError, NonFiniteError
from lpt_jax.run import trainer
from lpt_jax.weights import state_dict

from helpers import DATA
from tiny_run import tiny_config


def _with_nan(src, dst, name):
    with np.load(src) as f:
        arrays = {k: f[k] for k in f.files}
    arrays[name] = arrays[name].copy()
    arrays[name].flat[3] = np.nan
    np.savez(dst, **arrays)
    return str(dst)


def test_a_backbone_with_a_nan_weight_is_refused_before_any_write(tmp_path):
    config = tiny_config(tmp_path)
    name = "Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel"
    config.backbone.checkpoint = _with_nan(config.backbone.checkpoint, tmp_path / "nan.npz", name)
    with pytest.raises(CheckpointError) as err:
        trainer.train(config, str(tmp_path / "wd"))
    assert f"nan.npz holds non-finite values in {name} (1 of " in str(err.value)
    assert not (tmp_path / "wd").exists()


def _write_safetensors(path, arrays):
    header, offset, blobs = {}, 0, []
    for name, a in arrays.items():
        blob = np.ascontiguousarray(a, np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
    return str(path)


def test_convert_refuses_a_nan_backbone_and_writes_nothing(tmp_path):
    arrays = state_dict.read_state_dict(str(DATA / "convert" / "timm_vit.safetensors"))
    arrays["blocks.0.attn.qkv.weight"] = arrays["blocks.0.attn.qkv.weight"].copy()
    arrays["blocks.0.attn.qkv.weight"][0, 0] = np.inf
    bad = _write_safetensors(tmp_path / "nan.safetensors", arrays)
    with pytest.raises(CheckpointError, match="nan.safetensors holds non-finite values in "):
        convert.convert_backbone(bad, str(tmp_path / "out.npz"), num_heads=2)
    assert not (tmp_path / "out.npz").exists()


def test_a_first_step_gone_non_finite_cites_no_checkpoint(tmp_path):
    config = tiny_config(tmp_path)
    config.train.phases, config.optim.warmup_epochs, config.optim.base_lr = "1", 0, 1e30
    config.train.log_every_steps = 1  # the step's metrics are read before its checkpoint
    with pytest.raises(NonFiniteError) as err:
        trainer.train(config, str(tmp_path / "wd"))
    assert "at step 1" in str(err.value)
    assert "no checkpoint of this phase was saved yet" in str(err.value)
    config.train.log_every_steps = 2  # read after step 1's checkpoint: that one is cited
    with pytest.raises(NonFiniteError, match="the checkpoint of step 1 holds the last good"):
        trainer.train(config, str(tmp_path / "wd2"))
    assert (tmp_path / "wd2" / "phase1" / "checkpoints" / "1").is_dir()
