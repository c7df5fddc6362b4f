"""Pretext methods for `tfxfer pretrain`, one file each, and their registry.

    supervised   classify the source labels (`supervised.py`)
    simclr       InfoNCE / NT-Xent over two augmented views (`simclr.py`)
    autoencoder  reconstruct the input, optionally denoising (`autoencoder.py`)

Importing the package loads no TensorFlow: the methods load when one is
first looked up (`get_method`, `list_methods`).
"""

from tfxfer.pretext import options  # noqa: F401  (the built-in methods' options join the config)
from tfxfer.pretext.registry import PretextMethod, get_method, list_methods, register_method

__all__ = ["PretextMethod", "get_method", "list_methods", "register_method"]
