"""Device mesh, shardings, and host-local batches -> global arrays (single- and multi-host)."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lpt_jax.errors import ConfigError

DATA_AXIS = "data"


def maybe_initialize_distributed() -> None:
    """Starts jax.distributed when launched as one of several processes.

    Cloud TPU pods are auto-detected by JAX; elsewhere the standard variables
    (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) say so.
    """
    if jax.distributed.is_initialized() if hasattr(jax.distributed, "is_initialized") else False:
        return
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]))
    elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        jax.distributed.initialize()  # multi-host TPU slice: everything auto-detected


def make_mesh(devices=None) -> Mesh:
    """A 1-D data-parallel mesh over `devices` (default: all). Auto axis: replicated tokens
    may meet batch-sharded ones without explicit sharding annotations."""
    devices = list(devices if devices is not None else jax.devices())
    return jax.make_mesh((len(devices),), (DATA_AXIS,), (jax.sharding.AxisType.Auto,),
                         devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "batch_size") -> None:
    n = mesh.devices.size
    if global_batch % n:
        raise ConfigError(f"{what}={global_batch} is not divisible by the {n} devices of the "
                         f"mesh; choose a multiple of {n}")
    if global_batch % jax.process_count():
        raise ConfigError(f"{what}={global_batch} is not divisible by the "
                         f"{jax.process_count()} processes")


def global_batch(local_tree, mesh: Mesh):
    """Each process passes its own share; returns global arrays sharded along the batch."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_tree)


def gather(x):
    """A global batch-sharded array, whole, on every process (itself with one process)."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(x, tiled=True)


def sync(name: str) -> None:
    """Waits until every process reaches this point (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
