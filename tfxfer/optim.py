"""Optimizers and learning-rate schedules for fine-tuning."""

import keras

__all__ = ["OPTIMIZERS", "SCHEDULES", "make_schedule", "make_optimizer", "make_optimizers"]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine")


def make_schedule(lr, schedule="constant", total_steps=None, warmup_steps=0):
    """A constant learning rate, or cosine decay to 0 after a linear warmup."""
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"Unknown schedule {schedule!r}.")
    warmup_steps = int(warmup_steps)
    decay_steps = max(int(total_steps) - warmup_steps, 1)
    if warmup_steps:
        return keras.optimizers.schedules.CosineDecay(
            0.0, decay_steps, warmup_target=lr, warmup_steps=warmup_steps
        )
    return keras.optimizers.schedules.CosineDecay(lr, decay_steps)


def make_optimizer(name, learning_rate, weight_decay=0.0):
    """`sgd` (momentum 0.9), `adam` or `adamw`."""
    decay = weight_decay or None
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9, weight_decay=decay)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate, weight_decay=decay)
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay)
    raise ValueError(f"Unknown optimizer {name!r}.")


def make_optimizers(config, model, steps_per_epoch):
    """The head optimizer and, when needed, a separate backbone optimizer.

    `config` is a `FinetuneConfig`. The backbone gets its own optimizer when
    `backbone_lr_mult != 1`: a second optimizer, not scaled gradients, because
    Adam's update is invariant to the gradient's scale. With L2-SP on, the
    backbone gets no weight decay: the penalty already pulls it, toward its
    starting point rather than zero. The exclusion names every backbone
    weight, trainable now or not, so a later change of freeze policy keeps it.
    """
    optim, transfer = config.optim, config.transfer
    head = make_optimizer_for(optim, steps_per_epoch)
    backbone_decay = 0.0 if transfer.l2sp else optim.weight_decay
    if transfer.backbone_lr_mult != 1.0:
        return head, make_optimizer_for(optim, steps_per_epoch, optim.lr * transfer.backbone_lr_mult, backbone_decay)
    if optim.weight_decay and transfer.l2sp:
        head.exclude_from_weight_decay(var_list=model.backbone.weights)
    return head, None


def make_optimizer_for(optim, steps_per_epoch, lr=None, weight_decay=None):
    """The optimizer and schedule an `OptimConfig` describes (lr, decay overridable)."""
    total = optim.epochs * steps_per_epoch
    warmup = optim.warmup_epochs * steps_per_epoch
    schedule = make_schedule(optim.lr if lr is None else lr, optim.schedule, total, warmup)
    return make_optimizer(optim.optimizer, schedule, optim.weight_decay if weight_decay is None else weight_decay)
