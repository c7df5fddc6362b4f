"""Backbones: a registry of specs, and its members.

`applications.py` registers the `keras.applications` families, `hub.py` the
KerasHub transformers (ViT, DeiT, DINOv2, Swin); `simplecnn.py`
and `resnet9.py` are small networks for 28-64 px images, to pretrain with
`tfxfer pretrain`. A spec tells data, freezing and export everything they need.
"""

from tfxfer.backbones.registry import (
    KERAS_CACHE,
    BackboneSpec,
    create_backbone,
    get_backbone,
    layer_stages,
    list_backbones,
    register_backbone,
)
from tfxfer.backbones import applications, hub, resnet9, simplecnn  # noqa: F401  (they register themselves)

__all__ = ["KERAS_CACHE", "BackboneSpec", "create_backbone", "get_backbone", "layer_stages", "list_backbones", "register_backbone"]
