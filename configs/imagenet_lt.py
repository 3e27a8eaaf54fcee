"""ImageNet-LT (1000 classes); users supply ImageNet_LT_train.txt (data.split_dir or data.train_list)."""

from configs.common import base_config


def get_config(arg=None):
    c = base_config()
    c.data.name = "imagenet_lt"
    c.data.root = ""  # ImageNet root holding train/ and val/ as in the lists
    return c
