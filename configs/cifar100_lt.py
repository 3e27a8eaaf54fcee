"""CIFAR-100-LT; the argument is the imbalance ratio (100, 50 or 10): configs/cifar100_lt.py:50,
and/or 'lift' for LIFT's recipe instead of LPT's: configs/cifar100_lt.py:100,lift.

CIFAR images (32 px) are resized to the ViT's 224 px input, as the reference does.
"""

from configs.common import base_config, method_of, use_lift_schedule
from lpt_jax.errors import ConfigError


def get_config(arg=None):
    method, rest = method_of(arg)
    if len(rest) > 1 or (rest and not rest[0].isdigit()):
        raise ConfigError(f"configs/cifar100_lt.py:{arg}: expected an imbalance ratio (100, 50 "
                          "or 10), 'lift', or both ('100,lift')")
    c = base_config(method)
    c.data.name = "cifar100_lt"
    c.data.imbalance_ratio = int(rest[0]) if rest else 100
    c.eval.final_split = "test"  # CIFAR has no val split: train to the last epoch
    return use_lift_schedule(c) if method == "lift" else c
