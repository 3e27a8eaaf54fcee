"""iNaturalist 2018 (8142 classes) from TFDS `i_naturalist2018` (prepared beforehand)."""

from configs.common import base_config, method_of, use_lift_schedule
from lpt_jax.errors import ConfigError


def get_config(arg=None):
    """`:lift` runs LIFT's recipe (configs.common.use_lift_schedule) instead of LPT's."""
    method, rest = method_of(arg)
    if rest:
        raise ConfigError(f"configs/inaturalist2018.py:{arg}: expected no argument or 'lift'")
    c = base_config(method)
    c.data.name = "inaturalist2018"
    c.eval.final_split = "val"  # iNaturalist 2018 reports on its official val split
    return use_lift_schedule(c) if method == "lift" else c
