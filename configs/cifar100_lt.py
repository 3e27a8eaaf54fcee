"""CIFAR-100-LT; the argument is the imbalance ratio (100, 50 or 10): configs/cifar100_lt.py:50.

CIFAR images (32 px) are resized to the ViT's 224 px input, as the reference does.
"""

from configs.common import base_config


def get_config(arg=None):
    c = base_config()
    c.data.name = "cifar100_lt"
    c.data.imbalance_ratio = int(arg) if arg else 100
    c.eval.final_split = "test"  # CIFAR has no val split: train to the last epoch
    return c
