"""The learning-rate range test (Smith, "Cyclical Learning Rates for Training
Neural Networks", 2015; fastai's `lr_find`).

A copy of the run's exact setup (data, augmentation, model, freeze policy,
L2-SP, optimizers, precision) trains for about 100 steps while the learning
rate grows exponentially from `start_lr` to `end_lr`; the loss, smoothed,
is plotted against the learning rate, and one is suggested by the rule
`minimum/10`: a tenth of the rate at the lowest smoothed loss. The test stops early once the
smoothed loss exceeds four times its minimum: the learning rate has
diverged. With a backbone optimizer of its own (`--backbone-lr-mult`,
`--lr-decay`) every optimizer's rate grows alike, at its multiple of the
head's, and the suggestion is the head's rate, which `--lr` sets.

Nothing is written but the plot: no run folder, no checkpoint.
"""

import dataclasses
import math

import keras
import numpy as np

from tfxfer import runs
from tfxfer.compiling import compiled_model
from tfxfer.backbones.pretrained import with_pretrained_spec
from tfxfer.data.pipeline import set_epoch
from tfxfer.errors import TfxferError
from tfxfer.freezing import resolve_train_bn
from tfxfer.runtime import set_precision

__all__ = ["LRFinding", "lr_find", "smooth", "minimum_tenth", "RULE"]

RULE = "minimum/10 (a tenth of the rate at the lowest smoothed loss)"
DIVERGED = 4.0  # the test stops once the smoothed loss exceeds this many times its minimum


@dataclasses.dataclass
class LRFinding:
    """What a range test found: the rates tried, the raw and smoothed losses,
    the suggested rate and the rule that picked it."""

    lrs: list
    losses: list
    smoothed: list
    suggestion: float
    rule: str = RULE


class RangeTestRate(keras.optimizers.schedules.LearningRateSchedule):
    """`scale * start * (end / start) ** (step / steps)`: an exponential sweep."""

    def __init__(self, start, end, steps, scale=1.0):
        self.start, self.end, self.steps, self.scale = float(start), float(end), int(steps), float(scale)

    def __call__(self, step):
        progress = keras.ops.cast(step, "float32") / max(self.steps - 1, 1)
        return self.scale * self.start * keras.ops.power(self.end / self.start, progress)

    def get_config(self):
        return {"start": self.start, "end": self.end, "steps": self.steps, "scale": self.scale}


def smooth(losses, beta=0.98):
    """Exponential moving average of `losses` with bias correction."""
    average, out = 0.0, []
    for i, loss in enumerate(losses, 1):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta**i))
    return out


def minimum_tenth(lrs, smoothed):
    """A tenth of the rate at which the smoothed loss is lowest.

    At the minimum the rate is already about to make the loss climb; a tenth
    of it is on the falling part of the curve, where training makes the most
    progress and stays stable. (The longest-falling-stretch rule, fastai's
    `valley`, was tried too: noise on the flat start of the curve stretches
    the stretch backwards and drags its suggestion toward the flat part.)
    """
    if len(smoothed) < 3:
        raise TfxferError(f"The range test ran only {len(smoothed)} steps before the loss diverged; "
                          "lower --start-lr or give more training images.")
    return float(lrs[int(np.argmin(smoothed))]) / 10


def lr_find(config, steps=100, start_lr=1e-7, end_lr=10.0, data=None, log=print):
    """Run the range test for `config` (a `FinetuneConfig`); returns an `LRFinding`.

    `data` is `(train, info, image_size)` when the caller has loaded them
    (`finetune --lr auto`); precision and seeds are then the caller's too.
    """
    if not 0 < start_lr < end_lr:
        raise TfxferError(f"--start-lr must be above 0 and below --end-lr, got {start_lr:g} and {end_lr:g}.")
    if steps < 10:
        raise TfxferError(f"A range test needs at least 10 steps, got {steps}.")
    if config.transfer.probe:
        raise TfxferError(f"--probe {config.transfer.probe} fits without a learning rate: there is nothing for a range "
                          "test to find; drop --probe.")
    if config.optim.lr == "auto":
        # The optimizers' ratios to the head's rate are all the test needs; a copy, so the caller's stays auto.
        config = config.with_options(lr=1.0)
    own = data is None
    if own:
        config = with_pretrained_spec(config)
        runs.seed_everything(config.run.seed, config.run.deterministic)
        policy, why = set_precision(config.run.precision)
        log(f"precision: {policy} ({why})")
    try:
        if data is None:
            train, _, _, info, image_size = runs.load_data(config, log)
        else:
            train, info, image_size = data
        return _sweep(config, train, info, image_size, steps, start_lr, end_lr, log)
    finally:
        if own:
            keras.mixed_precision.set_global_policy("float32")


def _sweep(config, train, info, image_size, steps, start_lr, end_lr, log):
    train_bn, _ = resolve_train_bn(config.transfer.train_bn, config.model.weights)
    model = compiled_model(config, info, image_size, train_bn)
    head_lr = float(keras.ops.convert_to_numpy(model.head_optimizer.learning_rate))
    for optimizer in [model.head_optimizer, *model.backbone_optimizers]:
        scale = float(keras.ops.convert_to_numpy(optimizer.learning_rate)) / head_lr
        optimizer.learning_rate = RangeTestRate(start_lr, end_lr, steps, scale)
    undo = model.training_speedups(log)
    lrs, losses, smoothed = [], [], []
    try:
        epoch = 0
        while len(losses) < steps:
            set_epoch(train, epoch)
            for x, y in train:
                lrs.append(start_lr * (end_lr / start_lr) ** (len(losses) / max(steps - 1, 1)))
                loss = float(model.train_on_batch(x, y, return_dict=True)["loss"])
                losses.append(loss)
                smoothed = smooth(losses)
                if not math.isfinite(loss) or smoothed[-1] > DIVERGED * min(smoothed):
                    break
                if len(losses) == steps:
                    break
            else:
                epoch += 1
                continue
            break
    finally:
        undo()
    cut = int(np.argmin(smoothed)) + 1 if not math.isfinite(losses[-1]) else len(smoothed)
    finding = LRFinding(lrs[:cut], losses[:cut], smoothed[:cut], minimum_tenth(lrs[:cut], smoothed[:cut]))
    log(f"lr-find: {len(losses)} steps from {start_lr:g} to {lrs[-1]:.3g}; lowest smoothed loss "
        f"{min(smoothed):.4f} at lr {lrs[int(np.argmin(smoothed))]:.3g}; suggested lr {finding.suggestion:.3g} "
        f"by the rule {RULE}")
    return finding
