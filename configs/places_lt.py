"""Places-LT (365 classes) with a frozen AugReg ViT-B/16 in21k: docs/spec.md defaults.

  python run.py --config=configs/places_lt.py --workdir=gs://bucket/places \
      --config.data.root=gs://bucket/places365_standard

With an argument, a big_vision SigLIP image tower instead (docs/siglip.md), e.g.
`configs/places_lt.py:siglip_so400m` (So400m/14, 224 px; the others: configs.common.SIGLIP);
add `--config.model.head_init=text` for a head initialised from the class names.
`configs/places_lt.py:lift` (or `:siglip_b16,lift`) runs LIFT's recipe instead of LPT's.
"""

from configs.common import SIGLIP, base_config, method_of, use_lift_schedule, use_siglip
from lpt_jax.errors import ConfigError


def get_config(arg=None):
    method, rest = method_of(arg)
    c = base_config(method)
    c.data.name = "places_lt"
    c.data.root = ""  # places365_standard image root, or a prepared dir (README)
    if method == "lift":
        use_lift_schedule(c)
    for part in rest:
        if part not in SIGLIP:
            raise ConfigError(f"configs/places_lt.py:{arg}: expected no argument, 'lift', one "
                              f"of {sorted(SIGLIP)} or one of them and 'lift'")
        use_siglip(c, part)
    return c
