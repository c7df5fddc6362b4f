"""scikit-learn's 1,797 8x8 handwritten digits: real images an installed package
ships, so the quickstart and tests run offline."""

import numpy as np

from tfxfer.data.splits import Split

__all__ = ["digits"]


def digits(seed):
    """`({"train", "test"} -> Split, class names)`: a stratified 80/20 split,
    images scaled to 0-255 and tiled to RGB."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = np.repeat((data.images * (255.0 / 16.0)).round().astype(np.uint8)[..., None], 3, axis=-1)
    labels = data.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=0.2, stratify=labels, random_state=seed)
    splits = {"train": Split(len(y_train), y_train, x_train), "test": Split(len(y_test), y_test, x_test)}
    return splits, [str(i) for i in range(10)]
