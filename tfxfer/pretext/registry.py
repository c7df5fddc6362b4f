"""The registry of pretext methods: each method file registers one `PretextMethod`."""

import dataclasses
from typing import Callable, Optional

from tfxfer.config import add_pretext_options
from tfxfer.errors import did_you_mean

__all__ = ["PretextMethod", "register_method", "get_method", "METHODS"]

# Names of the methods, filled as their modules register; the config reads it.
METHODS = []
_REGISTRY = {}


def _no_callbacks(model, run_dir, val, info, config):
    return []


def _compile_plain(model, optimizer, config, info):
    model.compile(optimizer=optimizer, jit_compile=config.run.jit_compile)


@dataclasses.dataclass(frozen=True)
class PretextMethod:
    """What `tfxfer pretrain` needs to know about one method.

    Args:
        name: the `--method` name.
        build: `(config, info, image_size) -> keras.Model` with a `backbone`.
        augment: `(config) -> ` the train pipeline's augmentation: a name of
            `tfxfer.data.AUGMENTATIONS` or a per-example `fn(image, seed)`.
        monitor: `(info) -> (log key, "max" | "min")`: the best epoch.
        settings: `(config) -> dict` recorded in `backbone.json`.
        compile: `(model, optimizer, config, info)`.
        validation: `(val, config) -> ` the validation data `fit` evaluates, or `None`.
        callbacks: `(model, run_dir, val, info, config) -> [callbacks]`.
        needs_labels: the method trains on the source labels.
        options: a dataclass of the method's own options, declared with
            `tfxfer.config.option` and checked by its `validate()`; they join
            the `pretext` config group, so `--NAME` flags and YAML set them and
            the method reads `config.pretext.NAME`.
    """

    name: str
    build: Callable
    augment: Callable
    monitor: Callable
    settings: Callable
    compile: Callable = _compile_plain
    validation: Optional[Callable] = None
    callbacks: Callable = _no_callbacks
    needs_labels: bool = False
    options: Optional[type] = None


def register_method(method):
    if method.name in _REGISTRY:
        raise ValueError(f"Pretext method {method.name!r} is already registered.")
    if method.options is not None:
        add_pretext_options(method.options)
    _REGISTRY[method.name] = method
    METHODS.append(method.name)
    return method


def get_method(name):
    try:
        return _REGISTRY[name]
    except KeyError:
        raise did_you_mean(name, _REGISTRY, "pretext method") from None
