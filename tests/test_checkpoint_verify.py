"""Train-state checkpoints are verified, not only readable: a checksum recorded at save time
catches single-bit flips that Orbax restores silently, a damaged newest step falls back to the
previous one with one warning line (and is set aside so training can save that step again), a
non-finite state is never saved, and keep_checkpoints < 1 is refused."""

import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from lpt_jax.errors import ConfigError, DamagedCheckpointError, NonFiniteError
from lpt_jax.run import checkpoint as ckpt_lib
from lpt_jax.run.checkpoint import PhaseCheckpointer

META = {"phase": 2, "total_steps": 100, "steps_per_epoch": 10}


def _state(seed: int) -> dict:
    """A train state shaped like the trainer's: {trainable, opt_state, step, rng}, with an
    array large enough that its chunk is a data region of its own (~128 KiB)."""
    rng = np.random.default_rng(seed)
    trainable = {"head": {"kernel": jnp.asarray(rng.normal(size=(256, 128)), jnp.float32),
                          "bias": jnp.asarray(rng.normal(size=(128,)), jnp.float32)},
                 "prompt": jnp.asarray(rng.normal(size=(10, 64)), jnp.bfloat16)}
    opt_state = optax.sgd(0.1, momentum=0.9).init(trainable)
    opt_state = jax.tree.map(lambda x: x + 0.5, opt_state)
    return {"trainable": trainable, "opt_state": opt_state, "step": jnp.int32(seed),
            "rng": jax.random.PRNGKey(seed)}


def _host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(_host(a), _host(b)))


def _write(directory, steps=(4, 8)) -> dict:
    """Checkpoints of `steps` (each its own state); returns {step: state}."""
    ck = PhaseCheckpointer(str(directory), every_steps=1, keep=5)
    states = {s: _state(s) for s in steps}
    for s in steps:
        assert ck.save(s, states[s], META)
    ck.close()
    return states


def _restore(directory, step):
    """Restores `step` with a fresh manager (no cache shared with earlier restores)."""
    ck = PhaseCheckpointer(str(directory), every_steps=1, keep=5)
    try:
        return ck.restore(step, jax.eval_shape(lambda: _state(0)))
    finally:
        ck.close()


def _flip(path: Path, pos: int, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 1 << bit
    path.write_bytes(bytes(data))


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_roundtrip_is_verified_with_and_without_a_target(tmp_path):
    states = _write(tmp_path / "ck")
    state, meta = _restore(tmp_path / "ck", 8)
    assert meta == META and _same(state, states[8])
    ck = PhaseCheckpointer(str(tmp_path / "ck"), every_steps=1, keep=5)
    raw, _ = ck.restore(8, None)  # Orbax's own tree (tuples as lists): same checksum
    assert _same(raw["trainable"], states[8]["trainable"])
    step, state, meta = ck.restore_latest_good(jax.eval_shape(lambda: _state(0)))
    assert step == 8 and meta == META and _same(state, states[8])
    ck.close()


# ~40 failed restores in a row, each with its own manager: now and then a TensorStore thread
# calls back into the closed event loop of an earlier one (Python reports it as unraisable).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_every_bit_flip_in_the_array_data_is_caught(tmp_path):
    """Single-bit flips spread over every file of the newest step: none may restore values
    other than those saved -- each is refused (by Orbax/TensorStore or by the checksum) or
    restores exactly the saved state (a byte the restore never reads, e.g. in a b-tree node's
    unused space). Before the checksum, most flips in the array data restored silently."""
    directory = tmp_path / "ck"
    states = _write(directory)
    step_dir = directory / "8"
    outcomes, data_files = {"orbax": 0, "checksum": 0}, []
    for path in sorted(p for p in step_dir.rglob("*") if p.is_file()):
        size = path.stat().st_size
        backup = path.read_bytes()
        path.unlink()
        try:
            _restore(directory, 8)
            holds_data = False
        except DamagedCheckpointError:
            holds_data = path.parent.name == "d"  # an OCDBT data file that the restore reads
        path.write_bytes(backup)
        if holds_data:
            data_files.append(size)
        lo, hi = (size // 20, size - size // 20) if holds_data else (0, size - 1)
        for i, pos in enumerate(np.linspace(lo, hi, 8 if holds_data else 4).astype(int)):
            _flip(path, pos, bit=i % 8)
            try:
                state, _ = _restore(directory, 8)
                assert _same(state, states[8]), f"flip at byte {pos} of {path}: wrong values"
            except DamagedCheckpointError as e:
                outcomes["checksum" if "checksum" in str(e) else "orbax"] += 1
            finally:
                path.write_bytes(backup)
    assert _same(_restore(directory, 8)[0], states[8])
    assert any(size > 64_000 for size in data_files), data_files  # the 128 KiB array's file
    assert outcomes["checksum"] > 0, outcomes  # flips that only the checksum caught
    print(f"data files {data_files}; damage caught by Orbax/TensorStore: {outcomes['orbax']}, "
          f"only by the checksum: {outcomes['checksum']}")


def _damage(step_dir: Path, how: str) -> None:
    data = max((p for p in step_dir.rglob("*") if p.parent.name == "d"),
               key=lambda p: p.stat().st_size)
    if how == "flip":
        _flip(data, data.stat().st_size // 2, 3)
    elif how == "truncate":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif how == "remove_data":
        data.unlink()
    elif how == "remove_metadata":
        (step_dir / "state" / "_METADATA").unlink()
    elif how == "meta_value":  # the metadata is covered too: "phase": 2 -> 3
        meta = step_dir / "meta" / "metadata"
        meta.write_text(meta.read_text().replace('"phase": 2', '"phase": 3'))
    elif how == "meta_key":  # a damaged key name must not pass for an old checkpoint
        meta = step_dir / "meta" / "metadata"
        meta.write_text(meta.read_text().replace("lpt_state_sha256", "lpt_state^sha256"))


@pytest.mark.parametrize("how", ["flip", "truncate", "remove_data", "remove_metadata",
                                 "meta_value", "meta_key"])
def test_damaged_newest_step_falls_back_with_one_warning(tmp_path, caplog, how):
    directory = tmp_path / "ck"
    states = _write(directory)
    _damage(directory / "8", how)
    caplog.set_level(logging.WARNING)
    ck = PhaseCheckpointer(str(directory), every_steps=1, keep=5)
    step, state, meta = ck.restore_latest_good(jax.eval_shape(lambda: _state(0)))
    assert step == 4 and meta == META and _same(state, states[4])
    lines = [w for w in _warnings(caplog) if "step 8" in w]
    assert len(lines) == 1, _warnings(caplog)
    assert "resuming from step 4" in lines[0] and "8.damaged-" in lines[0]
    assert "\n" not in lines[0] and len(lines[0]) < 800, lines[0]
    names = sorted(os.listdir(directory))
    assert names[0] == "4" and names[1].startswith("8.damaged-") and len(names) == 2, names
    # Training goes on and saves step 8 again; the new one verifies.
    assert ck.save(8, states[8], META, force=True)
    ck.close()
    assert _same(_restore(directory, 8)[0], states[8])


def test_no_good_checkpoint_is_an_error_and_changes_nothing(tmp_path):
    directory = tmp_path / "ck"
    _write(directory, steps=(8,))
    _damage(directory / "8", "truncate")
    ck = PhaseCheckpointer(str(directory), every_steps=1, keep=5)
    with pytest.raises(DamagedCheckpointError) as err:
        ck.restore_latest_good(jax.eval_shape(lambda: _state(0)))
    ck.close()
    assert "checkpoint step 8" in str(err.value) and "move" in str(err.value)
    assert os.listdir(directory) == ["8"]


def test_no_checkpoint_is_none(tmp_path):
    ck = PhaseCheckpointer(str(tmp_path / "ck"), every_steps=1, keep=5)
    assert ck.restore_latest_good(jax.eval_shape(lambda: _state(0))) is None
    ck.close()


@pytest.mark.parametrize("where", ["trainable", "opt_state"])
def test_nonfinite_state_is_never_saved(tmp_path, where):
    state = _state(3)
    if where == "trainable":
        state["trainable"]["head"]["kernel"] = state["trainable"]["head"]["kernel"].at[1, 2].set(
            jnp.nan)
        leaf = "trainable/head/kernel (1 of 32768 values)"
    else:
        state["opt_state"] = jax.tree.map(lambda x: x.at[0].set(jnp.inf) if x.ndim == 1 else x,
                                          state["opt_state"])
        leaf = "opt_state/0/trace/head/bias (1 of 128 values)"
    ck = PhaseCheckpointer(str(tmp_path / "ck"), every_steps=1, keep=5)
    with pytest.raises(NonFiniteError) as err:
        ck.save(3, state, META, force=True)
    assert leaf in str(err.value) and "step 3" in str(err.value)
    ck.close()
    assert not [n for n in os.listdir(tmp_path / "ck") if n[0].isdigit()]


@pytest.mark.parametrize("keep", [0, -1])
def test_keep_below_one_is_a_config_error(tmp_path, keep):
    with pytest.raises(ConfigError, match="train.keep_checkpoints"):
        PhaseCheckpointer(str(tmp_path / "ck"), every_steps=1, keep=keep)


def test_the_checksum_is_computed_only_on_steps_that_save(tmp_path, monkeypatch):
    calls = []
    real = ckpt_lib._host_leaves
    monkeypatch.setattr(ckpt_lib, "_host_leaves", lambda s: calls.append(1) or real(s))
    ck = PhaseCheckpointer(str(tmp_path / "ck"), every_steps=4, keep=5)
    state = _state(1)
    saved = [s for s in range(1, 10) if ck.save(s, state, META)]
    ck.close()
    assert 4 in saved and 8 in saved and len(saved) <= 3  # (Orbax also saves the first step)
    assert len(calls) == len(saved)


def test_checkpoint_without_checksum_restores_unverified(tmp_path, caplog):
    """Checkpoints written before checksums were recorded still resume (with a warning)."""
    state = _state(5)
    manager = ocp.CheckpointManager(str(tmp_path / "ck"), options=ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=False))
    manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave(META)))
    manager.close()
    caplog.set_level(logging.WARNING)
    restored, meta = _restore(tmp_path / "ck", 5)
    assert meta == META and _same(restored, state)
    assert any("no checksum" in w for w in _warnings(caplog))
