"""The registry of pretext methods: each method file registers one `PretextMethod`.

The built-in methods load TensorFlow, so their modules are imported when a
method is first looked up, not when the registry is; their options are in
`tfxfer.pretext.options`, for `tfxfer pretrain --help`.
"""

import dataclasses
import importlib
from typing import Callable, Optional

from tfxfer.config import add_pretext_options
from tfxfer.errors import did_you_mean

__all__ = ["PretextMethod", "register_method", "get_method", "list_methods"]

_BUILT_IN = ("tfxfer.pretext.supervised", "tfxfer.pretext.simclr", "tfxfer.pretext.autoencoder")
_REGISTRY = {}
_loaded = []


def _load_built_in():
    """Import the built-in methods once, which register themselves."""
    if not _loaded:
        _loaded.append(True)
        for module in _BUILT_IN:
            importlib.import_module(module)


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
    """Add `method`; a name can be registered once, and its options must not
    take the name of another option of `tfxfer pretrain`."""
    _load_built_in()
    if method.name in _REGISTRY:
        raise ValueError(f"Pretext method {method.name!r} is already registered.")
    if method.options is not None:
        add_pretext_options(method.options)
    _REGISTRY[method.name] = method
    return method


def list_methods():
    """The registered method names, built-in ones first."""
    _load_built_in()
    return list(_REGISTRY)


def get_method(name):
    _load_built_in()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise did_you_mean(name, _REGISTRY, "pretext method") from None
