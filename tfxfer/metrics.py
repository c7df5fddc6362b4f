"""Training metrics that take class ids [B] or class probabilities [B, C]:
accuracy, and macro-F1 from a running confusion matrix (for `--monitor
val_macro_f1`). Both agree with `tfxfer.evaluation.classification_report`."""

import keras

__all__ = ["Accuracy", "MacroF1"]


def _ids(y_true):
    if len(y_true.shape) == 2 and y_true.shape[-1] > 1:
        return keras.ops.argmax(y_true, axis=-1)
    return keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int64")


def _accuracy(y_true, y_pred):
    return keras.ops.cast(keras.ops.equal(_ids(y_true), keras.ops.argmax(y_pred, axis=-1)), "float32")


@keras.saving.register_keras_serializable("tfxfer")
class Accuracy(keras.metrics.MeanMetricWrapper):
    """The share of argmax predictions equal to the (argmax) label."""

    def __init__(self, name="accuracy", dtype=None):
        super().__init__(_accuracy, name=name, dtype=dtype)

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype}


@keras.saving.register_keras_serializable("tfxfer")
class MacroF1(keras.metrics.Metric):
    """The mean over all classes of per-class F1; a class never predicted (or
    never present) has precision (recall) 0, as scikit-learn's `zero_division=0`."""

    def __init__(self, num_classes, name="macro_f1", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.num_classes = int(num_classes)
        self.confusion = self.add_variable((self.num_classes, self.num_classes), "zeros", dtype="float32", name="confusion")

    def update_state(self, y_true, y_pred, sample_weight=None):
        truth = keras.ops.one_hot(_ids(y_true), self.num_classes)
        predicted = keras.ops.one_hot(keras.ops.argmax(y_pred, axis=-1), self.num_classes)
        if sample_weight is not None:
            truth = truth * keras.ops.reshape(keras.ops.cast(sample_weight, "float32"), (-1, 1))
        self.confusion.assign_add(keras.ops.matmul(keras.ops.transpose(truth), predicted))

    def result(self):
        true_positive = keras.ops.diagonal(self.confusion)
        predicted = keras.ops.sum(self.confusion, axis=0)
        actual = keras.ops.sum(self.confusion, axis=1)
        precision = keras.ops.divide_no_nan(true_positive, predicted)
        recall = keras.ops.divide_no_nan(true_positive, actual)
        return keras.ops.mean(keras.ops.divide_no_nan(2 * precision * recall, precision + recall))

    def reset_state(self):
        self.confusion.assign(keras.ops.zeros((self.num_classes, self.num_classes)))

    def get_config(self):
        return {"num_classes": self.num_classes, "name": self.name, "dtype": self.dtype}
