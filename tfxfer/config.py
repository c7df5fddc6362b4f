"""Typed run configuration: defaults here, overridden by a YAML file, then by flags.

The resolved config is saved as `config.yaml` in every run folder.
"""

import dataclasses
import re
from typing import Optional

import yaml

from tfxfer.errors import TfxferError, did_you_mean
from tfxfer.runtime import PRECISIONS

__all__ = ["FinetuneConfig", "load_config", "default_run_name"]


@dataclasses.dataclass
class FinetuneConfig:
    # data
    dataset: Optional[str] = None  # built-in ("digits") or tensorflow-datasets name
    data_dir: Optional[str] = None  # an image folder instead of a dataset name
    tfds_data_dir: Optional[str] = None  # where prepared tfds data lives
    train_split: str = "train"
    val_split: Optional[str] = None  # None: "validation" if it exists, else carved from train
    test_split: Optional[str] = None  # None: "test" if it exists
    val_fraction: float = 0.1  # share of train carved out when there is no validation split
    max_train_examples: Optional[int] = None  # a seeded sample of train, for quick runs
    augment: str = "none"  # none | flip | flip_crop
    # model
    backbone: str = "resnet50"
    weights: str = "imagenet"  # imagenet | none | path of a weights file
    image_size: Optional[int] = None  # None: the backbone's default
    freeze: str = "full"  # head | full | stages:N | from:LAYER
    train_bn: bool = False  # BN statistics of pretrained weights are worth keeping
    bn_momentum: Optional[float] = None  # None: the backbone's (0.99); 0.9 suits random init
    dropout: float = 0.0
    # regularization
    l2sp: float = 0.0  # alpha: pull toward the starting weights (Li et al. 2018)
    l2sp_scope: str = "kernels"  # kernels (paper) | all
    head_l2: float = 0.0  # beta: plain L2 on the new head
    # optimization
    optimizer: str = "sgd"  # sgd (momentum 0.9) | adam | adamw
    lr: float = 1e-3  # the classic fine-tuning recipe: SGD, 1e-3, momentum 0.9
    weight_decay: float = 0.0  # never applied to the backbone while L2-SP is on
    schedule: str = "constant"  # constant | cosine
    warmup_epochs: float = 0.0  # linear warmup before the cosine decay
    backbone_lr_mult: float = 1.0  # backbone lr = lr * this, with its own optimizer
    epochs: int = 5
    batch_size: int = 64
    # execution
    seed: int = 0
    deterministic: bool = False  # TF op determinism: a guarantee on any device, at a cost (README)
    precision: str = "auto"  # auto | float32 | mixed_bfloat16 | mixed_float16
    jit_compile: bool = False  # XLA; slower on CPU convolutions, measure first
    distribute: str = "none"  # none | mirrored (all visible GPUs, or CPUs)
    # output
    run_name: Optional[str] = None  # None: derived from dataset, backbone and policy
    output_dir: str = "saved_models"

    def validate(self):
        choices = {
            "augment": ("none", "flip", "flip_crop"),
            "l2sp_scope": ("kernels", "all"),
            "optimizer": ("sgd", "adam", "adamw"),
            "schedule": ("constant", "cosine"),
            "distribute": ("none", "mirrored"),
            "precision": PRECISIONS,
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise did_you_mean(getattr(self, key), allowed, key.replace("_", "-"))
        for key in ("l2sp", "head_l2", "weight_decay", "warmup_epochs", "dropout"):
            if not getattr(self, key) >= 0:
                raise TfxferError(f"{key} must be >= 0, got {getattr(self, key)}.")
        for key in ("lr", "backbone_lr_mult", "epochs", "batch_size"):
            if not getattr(self, key) > 0:
                raise TfxferError(f"{key} must be > 0, got {getattr(self, key)}.")
        if self.jit_compile and self.deterministic:
            raise TfxferError(
                "--jit-compile needs --no-deterministic: Keras silently turns XLA off while TF op determinism is on."
            )
        if self.precision == "mixed_float16" and self.backbone_lr_mult != 1.0:
            raise TfxferError(
                "--precision mixed_float16 cannot be combined with --backbone-lr-mult: its loss scaling covers one "
                "optimizer; use mixed_bfloat16 or float32."
            )
        if self.image_size is not None and self.image_size < 32:
            raise TfxferError(f"image_size must be at least 32, got {self.image_size}.")
        return self

    def to_dict(self):
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(FinetuneConfig)}
OPTIONAL_NUMBERS = {"image_size": int, "max_train_examples": int, "bn_momentum": float}


def load_config(path=None, **overrides):
    """Defaults, then the YAML file at `path`, then the non-`None` `overrides`."""
    values = {}
    if path:
        try:
            with open(path) as f:
                values = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise TfxferError(f"Config file {path!r} does not exist.") from None
        if not isinstance(values, dict):
            raise TfxferError(f"Config file {path!r} must hold a mapping of keys to values.")
    values = {k.replace("-", "_"): v for k, v in values.items()}
    values.update({k: v for k, v in overrides.items() if v is not None})
    for key in values:
        if key not in FIELDS:
            raise did_you_mean(key, FIELDS, "config key")
    config = FinetuneConfig(**{k: _coerce(k, v) for k, v in values.items()})
    return config.validate()


def _coerce(key, value):
    default = FIELDS[key].default
    if value is None or default is None and key not in OPTIONAL_NUMBERS:
        return value
    kind = type(default) if default is not None else OPTIONAL_NUMBERS[key]
    if kind is bool and not isinstance(value, bool):
        raise TfxferError(f"Config key {key} must be true or false, got {value!r}.")
    try:
        return kind(value)
    except (TypeError, ValueError):
        what = {int: "a whole number", float: "a number"}.get(kind, "text")
        raise TfxferError(f"Config key {key} must be {what}, got {value!r}.") from None


def default_run_name(config):
    """`<dataset>-<backbone>-<policy>`, e.g. `cifar10-resnet50-stages2`."""
    import os

    source = config.dataset or os.path.basename(os.path.normpath(config.data_dir or "data"))
    name = f"{source}-{config.backbone}-{config.freeze}"
    if config.l2sp:
        name += "-l2sp"
    return re.sub(r"[^A-Za-z0-9_.-]+", "", name.replace(":", ""))
