"""ImageNet-LT (1000 classes); users supply ImageNet_LT_train.txt (data.split_dir or data.train_list)."""

from configs.common import base_config, method_of, use_lift_schedule
from lpt_jax.errors import ConfigError


def get_config(arg=None):
    """`:lift` runs LIFT's recipe (configs.common.use_lift_schedule) instead of LPT's."""
    method, rest = method_of(arg)
    if rest:
        raise ConfigError(f"configs/imagenet_lt.py:{arg}: expected no argument or 'lift'")
    c = base_config(method)
    c.data.name = "imagenet_lt"
    c.data.root = ""  # ImageNet root holding train/ and val/ as in the lists
    return use_lift_schedule(c) if method == "lift" else c
