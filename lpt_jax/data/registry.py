"""Data sets by name (`data.name`): each dataset module registers its builder with
`@register('places_lt')`. The built-in modules import TensorFlow, so they are imported on
the registry's first use, not with `import lpt_jax.data`."""

import importlib
from typing import Callable

_REGISTRY: dict[str, Callable] = {}
_BUILTIN_MODULES = ("cifar_lt", "image_folder", "inaturalist", "list_datasets")


def _register_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(f"lpt_jax.data.{module}")


def register(name: str):
    """Decorator: `@register('places_lt') def build(cfg) -> Source`."""
    def wrap(fn):
        _REGISTRY[name] = fn
        return fn
    return wrap


def registered_sources() -> tuple:
    _register_builtins()
    return tuple(sorted(_REGISTRY))


def builder(name: str) -> Callable:
    _register_builtins()
    return _REGISTRY[name]
