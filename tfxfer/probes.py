"""Probes: classifiers on a frozen backbone's features that train no backbone.

    knn     cosine k-nearest neighbours with temperature-weighted votes, as in
            DINO's evaluation (Caron et al., ICCV 2021): each of the k most
            similar training images votes for its class with weight
            exp(similarity / T); the votes, normalised, are the probabilities.
            DINO's defaults: k = 20, T = 0.07.
    linear  multinomial logistic regression (scikit-learn) on standardised
            features, its L2 strength chosen on the validation split; the
            standardisation is folded into the weights, so the head is the
            run's ordinary dense softmax layer.

Both read the features once (`tfxfer.feature_cache`, so `--feature-cache DIR`
reuses them across runs and strategies) and take seconds. A probe run is an
ordinary run of one epoch: the same run folder, metrics, confusion matrix,
predictions and a SavedModel that serves raw images.

The kNN head carries its feature bank: the training images' normalised
features and labels are weights of the head, so the SavedModel grows by
images x feature size x 4 bytes (10,000 images of ResNet50's 2,048 features:
82 MB). `--knn-bank` caps the images it keeps (default 20,000); above the cap
the bank is a class-stratified sample of that size, drawn with the run's seed,
and the run says so.
"""

import keras
import numpy as np

from tfxfer.errors import TfxferError

__all__ = ["PROBES", "KnnHead", "fit_linear", "bank_sample", "L2_GRID"]

PROBES = ("knn", "linear")
# Inverse L2 strengths (scikit-learn's C) tried on the validation split; standardised features keep one grid right
# for any backbone.
L2_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
# Added to every class's votes: a class no neighbour voted for keeps a small probability, so the loss stays finite.
_VOTE_FLOOR = 1e-6


@keras.saving.register_keras_serializable(package="tfxfer")
class KnnHead(keras.layers.Layer):
    """Class probabilities from the votes of the `k` nearest bank features.

    Args:
        num_classes: number of classes.
        bank_size: number of training images in the bank.
        k: neighbours that vote (at most `bank_size`).
        temperature: a neighbour votes with weight exp(cosine similarity / T).
    """

    def __init__(self, num_classes, bank_size, k=20, temperature=0.07, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_classes, self.bank_size = int(num_classes), int(bank_size)
        self.k, self.temperature = int(k), float(temperature)

    def build(self, input_shape):
        # Not trainable: the bank is set once from the training features (`set_bank`).
        self.bank = self.add_weight(shape=(self.bank_size, int(input_shape[-1])), initializer="zeros",
                                    trainable=False, name="bank")
        self.bank_labels = self.add_weight(shape=(self.bank_size,), initializer="zeros", dtype="int32",
                                           trainable=False, name="bank_labels")

    def set_bank(self, features, labels):
        self.bank.assign(_normalise(np.asarray(features, np.float32)))
        self.bank_labels.assign(np.asarray(labels, np.int32))

    def call(self, features):
        ops = keras.ops
        features = ops.cast(features, "float32")
        features = features / ops.maximum(ops.norm(features, axis=-1, keepdims=True), 1e-12)
        similarity = ops.matmul(features, ops.transpose(self.bank))
        nearest, index = ops.top_k(similarity, k=min(self.k, self.bank_size))
        # Shifted by the nearest's similarity: the same ratios as exp(s / T), without overflow for a small T.
        weights = ops.exp((nearest - nearest[:, :1]) / self.temperature)
        classes = ops.one_hot(ops.take(self.bank_labels, index), self.num_classes, dtype="float32")
        votes = ops.sum(weights[..., None] * classes, axis=1) + _VOTE_FLOOR
        return votes / ops.sum(votes, axis=-1, keepdims=True)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "bank_size": self.bank_size, "k": self.k,
                "temperature": self.temperature}


def _normalise(features):
    return features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)


def bank_sample(labels, size, seed):
    """Indices of at most `size` training images, each class kept in proportion (at least one image of each)."""
    labels = np.asarray(labels)
    if len(labels) <= size:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    # Largest remainder: the shares sum to `size` exactly; every class keeps one image while the bank has room.
    share = size * counts / len(labels)
    take = np.floor(share).astype(int)
    if len(classes) <= size:
        take = np.maximum(take, 1)
    for i in np.argsort(-(share - np.floor(share)), kind="stable"):
        if take.sum() >= size:
            break
        if take[i] < counts[i]:
            take[i] += 1
    while take.sum() > size:  # the one-per-class floor overshot: trim the largest
        take[np.argmax(take)] -= 1
    chosen = [rng.choice(np.flatnonzero(labels == cls), n, replace=False) for cls, n in zip(classes, take) if n]
    return np.sort(np.concatenate(chosen))


def fit_linear(train_features, train_labels, val_features, val_labels, num_classes, log=print):
    """`(kernel [D, classes], bias [classes], C, validation accuracy)` of the
    logistic regression whose inverse L2 strength `C` (from `L2_GRID`) scores
    best on the validation features; a tie goes to the lower validation
    log-loss, the run's own rule for a tie between epochs (on a few
    validation images accuracy ties often, and the strongest regulariser
    would win with flat, uncalibrated probabilities)."""
    from sklearn.linear_model import LogisticRegression

    train_labels = np.asarray(train_labels)
    missing = sorted(set(range(num_classes)) - set(train_labels.tolist()))
    if missing:
        raise TfxferError(f"The linear probe needs training images of every class; class {missing[0]} has none.")
    mean = train_features.mean(axis=0)
    std = train_features.std(axis=0) + 1e-6
    scaled_train, scaled_val = (train_features - mean) / std, (val_features - mean) / std
    val_labels = np.asarray(val_labels)
    best = None
    for c in L2_GRID:
        fitted = LogisticRegression(C=c, max_iter=2000).fit(scaled_train, train_labels)
        probabilities = fitted.predict_proba(scaled_val)
        accuracy = float((probabilities.argmax(axis=1) == val_labels).mean())
        loss = float(-np.log(np.maximum(probabilities[np.arange(len(val_labels)), val_labels], 1e-12)).mean())
        if best is None or (accuracy, -loss) > (best[1], -best[3]):
            best = (fitted, accuracy, c, loss)
    fitted, accuracy, c, _ = best
    log(f"linear probe: C {c:g} (inverse L2 strength, of {', '.join(f'{v:g}' for v in L2_GRID)}), "
        f"validation accuracy {accuracy:.4f}")
    coef, intercept = fitted.coef_, fitted.intercept_
    if coef.shape[0] == 1:  # two classes: one logit z for class 1, and softmax(0, z) is its sigmoid
        coef, intercept = np.concatenate([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    # The head sees raw features: (x - mean) / std @ W + b = x @ (W / std) + (b - mean / std @ W).
    kernel = coef.T / std[:, None]
    bias = intercept - (mean / std) @ coef.T
    return kernel.astype(np.float32), bias.astype(np.float32), c, accuracy
