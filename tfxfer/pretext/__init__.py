"""Pretext methods for `tfxfer pretrain`, one file each, and their registry.

    supervised   classify the source labels (`supervised.py`)
    simclr       InfoNCE / NT-Xent over two augmented views (`simclr.py`)
    autoencoder  reconstruct the input, optionally denoising (`autoencoder.py`)
"""

from tfxfer.pretext.registry import METHODS, PretextMethod, get_method, register_method
from tfxfer.pretext import supervised, simclr, autoencoder  # noqa: F401, E402  (they register themselves)

__all__ = ["METHODS", "PretextMethod", "get_method", "register_method"]
