"""Starting-point regularization for fine-tuning.

L2-SP (Li, Grandvalet, Davoine, "Explicit Inductive Bias for Transfer Learning
with Convolutional Networks", ICML 2018) replaces weight decay toward zero on the
transferred layers by a pull toward their pretrained values:

    Omega(w) = alpha * sum_i ||w_i - w0_i||^2  +  beta * ||w_head||^2

where w0 are the backbone's values when fine-tuning starts and w_head the new
head's kernels. As in the paper's reference code, only kernels are pulled by
default; BatchNorm parameters and biases are left free (`scope="all"` pulls
every trainable backbone weight).

With LoRA adapters (`tfxfer.lora`) a kernel stays as loaded and its merged
value is w0 + s * A @ B, with s = lora_alpha / rank: its distance from w0 is
the adapter's update, so each adapted kernel adds alpha * ||s * A @ B||^2.
"""

import tensorflow as tf

from tfxfer.config import SCOPES

__all__ = ["L2SP", "is_kernel"]


def is_kernel(variable):
    """True for convolution and dense kernels: not biases, not BN parameters."""
    return variable.name in ("kernel", "depthwise_kernel", "pointwise_kernel")


class L2SP:
    """The L2-SP penalty over a backbone, with anchors captured at construction.

    The anchors are constant tensors held outside the model, so they are never
    saved in checkpoints or SavedModels; a resumed run rebuilds them from the
    weights source. Weights are paired with their anchors by variable path.

    Args:
        backbone: the Keras model whose current weights are the anchors w0.
        alpha: coefficient of the pull toward w0; must be >= 0.
        scope: `"kernels"` (the paper's choice) or `"all"`.
        head_weights: kernels of the new head, penalized by `beta * ||w||^2`.
        beta: coefficient of the head's plain L2 penalty; must be >= 0.
        adapters: `[(A, B)]`, the factors of the backbone's LoRA adapters;
            their kernels are frozen, and each adapter's update is pulled
            toward zero instead.
        adapter_scale: the adapters' scale `lora_alpha / rank`.
    """

    def __init__(self, backbone, alpha, scope="kernels", head_weights=(), beta=0.0, adapters=(), adapter_scale=1.0):
        self.alpha = _non_negative("alpha", alpha)
        self.beta = _non_negative("beta", beta)
        if scope not in SCOPES:
            raise ValueError(f"L2-SP scope must be one of {SCOPES}, got {scope!r}.")
        self.scope = scope
        self._backbone = backbone
        self._head_weights = [w for w in head_weights if is_kernel(w)]
        self._adapters = list(adapters)
        self.adapter_scale = float(adapter_scale)
        self.anchors = {}
        if self.alpha:
            for w in self._candidates():
                if w.path in self.anchors:
                    raise ValueError(f"Two backbone weights share the path {w.path!r}.")
                self.anchors[w.path] = tf.constant(w.numpy(), dtype=tf.float32)

    def _candidates(self):
        weights = self._backbone.weights if self.alpha else []
        if self._adapters:
            # Under LoRA no kernel trains (an adapted one moves by its adapter's update, pulled below): no anchors.
            factors = {id(v) for pair in self._adapters for v in pair}
            weights = [w for w in weights if id(w) not in factors and not is_kernel(w)]
        return [w for w in weights if self.scope == "all" or is_kernel(w)]

    def penalized(self):
        """The (weight, anchor) pairs that the penalty acts on now."""
        return [(w, self.anchors[w.path]) for w in self._candidates() if w.trainable]

    def __call__(self):
        """alpha * sum ||w - w0||^2 over the trainable backbone weights, plus
        alpha * ||s * A @ B||^2 for each trainable adapter; float32."""
        # l2_loss (sum of squares / 2) is one kernel forward and one backward,
        # where square + reduce_sum are two of each: over 23 M ResNet50 weights
        # the penalty's passes over memory are its whole cost.
        terms = [tf.nn.l2_loss(tf.cast(w.value, tf.float32) - w0) for w, w0 in self.penalized()]
        pulled = (2.0 * self.alpha) * tf.add_n(terms) if terms else tf.constant(0.0)
        updates = [_squared_product(a, b) for a, b in self._adapters if self.alpha and a.trainable and b.trainable]
        if not updates:
            return pulled
        return pulled + (self.alpha * self.adapter_scale ** 2) * tf.add_n(updates)

    def head(self):
        """beta * ||w_head||^2, float32."""
        terms = [tf.reduce_sum(tf.square(tf.cast(w.value, tf.float32))) for w in self._head_weights]
        return self.beta * tf.add_n(terms) if terms and self.beta else tf.constant(0.0)

    def get_config(self):
        return {"alpha": self.alpha, "scope": self.scope, "beta": self.beta}


def _squared_product(a, b):
    """||A @ B||^2 (Frobenius), exactly, as sum((A^T A) * (B B^T)) = trace(A^T A B B^T).

    A rank-r product costs r x r matrices this way instead of one the size of
    the kernel. Keras's convolution adapter A has the kernel's shape with its
    last axis r: its product with B is the kernel, so A is read as a matrix."""
    rank = b.shape[0]
    a = tf.reshape(tf.cast(a.value, tf.float32), (-1, rank))
    b = tf.cast(b.value, tf.float32)
    return tf.reduce_sum(tf.matmul(a, a, transpose_a=True) * tf.matmul(b, b, transpose_b=True))


def _non_negative(name, value):
    value = float(value)
    if not value >= 0:
        raise ValueError(f"L2-SP {name} must be a number >= 0, got {value!r}.")
    return value
