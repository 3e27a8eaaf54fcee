"""iNaturalist 2018 (8142 classes) from TFDS `i_naturalist2018` (prepared beforehand)."""

from configs.common import base_config


def get_config(arg=None):
    c = base_config()
    c.data.name = "inaturalist2018"
    c.eval.final_split = "val"  # iNaturalist 2018 reports on its official val split
    return c
