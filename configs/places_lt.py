"""Places-LT (365 classes) with a frozen AugReg ViT-B/16 in21k: docs/spec.md defaults.

  python run.py --config=configs/places_lt.py --workdir=gs://bucket/places \
      --config.data.root=gs://bucket/places365_standard
"""

from configs.common import base_config


def get_config(arg=None):
    c = base_config()
    c.data.name = "places_lt"
    c.data.root = ""  # places365_standard image root, or a prepared dir (README)
    return c
