"""What every pretext model shares: raw uint8 pixels -> the backbone's own
preprocessing -> the headless backbone -> pooled features.

Only the backbone leaves a pretraining run (`backbone.weights.h5`); projection
heads, decoders and classifiers stay behind.
"""

import keras
import numpy as np

from tfxfer.backbones import create_backbone, get_backbone
from tfxfer.backbones.pretrained import input_normalization
from tfxfer.backbones.registry import feature_pool, set_bn_momentum
from tfxfer.model import Preprocess

__all__ = ["PretextModel", "backbone_features"]


class PretextModel(keras.Model):
    """Base of the pretext models: `features(images)` are the pooled backbone outputs.

    Args:
        backbone: registered backbone name.
        image_size: square input size.
        bn_momentum: momentum of the backbone's BatchNorm layers; `None` keeps its own.
        weights: where the backbone starts: `None` (random) or a weights file.
    """

    def __init__(self, backbone, image_size, bn_momentum=None, weights=None, **kwargs):
        super().__init__(**kwargs)
        self.backbone_name = backbone
        self.image_size = int(image_size)
        self.bn_momentum = bn_momentum
        get_backbone(backbone)
        self.backbone = create_backbone(backbone, weights, self.image_size)
        self.normalization = input_normalization(weights)
        self.preprocess = Preprocess(backbone, self.normalization, name="preprocess")
        set_bn_momentum(self.backbone, bn_momentum)
        self.pool = feature_pool(self.backbone)
        self.features_dim = int(self.backbone.output.shape[-1])

    def _build_by_calling(self):
        """Build every layer with one call on a blank batch: Keras would otherwise
        build the model by calling it on the data's inputs, which for a pretext
        model are tuples (two views; input and target)."""
        self(np.zeros((1, self.image_size, self.image_size, 3), np.uint8))
        self.built = True

    def features(self, images, training=False):
        return self.pool(self.backbone(self.preprocess(images), training=training))

    def get_config(self):
        return {"backbone": self.backbone_name, "image_size": self.image_size, "bn_momentum": self.bn_momentum, "name": self.name}


def backbone_features(model, dataset, max_images=None):
    """`(features [N, d], labels [N])` of a batched `(images, labels)` dataset."""
    features, labels = [], []
    count = 0
    for images, y in dataset:
        features.append(np.asarray(model.features(images, training=False), np.float32))
        labels.append(np.asarray(y))
        count += len(labels[-1])
        if max_images and count >= max_images:
            break
    return np.concatenate(features), np.concatenate(labels).astype(np.int64)
