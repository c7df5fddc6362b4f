"""Optimizers and learning-rate schedules for fine-tuning."""

import keras

from tfxfer.backbones import get_backbone
from tfxfer.config import OPTIMIZERS, SCHEDULES

__all__ = ["OPTIMIZERS", "SCHEDULES", "make_schedule", "make_optimizer", "make_optimizers", "stage_lr_multipliers", "regrow", "optimizer_map", "inner"]


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
    """The head optimizer and, when needed, the backbone's own: one optimizer,
    or a dict from stage name to optimizer.

    `config` is a `FinetuneConfig`. The backbone gets its own optimizer when
    `backbone_lr_mult != 1`, and one per stage with `lr_decay < 1` (see
    `stage_lr_multipliers`): other optimizers, not scaled gradients, because
    Adam's update is invariant to the gradient's scale. With L2-SP on, the
    backbone gets no weight decay: the penalty already pulls it, toward its
    starting point rather than zero. The exclusion names every backbone
    weight, trainable now or not, so a later change of freeze policy keeps it.
    """
    optim, transfer = config.optim, config.transfer
    head = make_optimizer_for(optim, steps_per_epoch)
    backbone_decay = 0.0 if transfer.l2sp else optim.weight_decay
    if transfer.lr_decay != 1.0:
        multipliers = stage_lr_multipliers(get_backbone(model.backbone_name).stages, transfer.lr_decay,
                                           transfer.backbone_lr_mult)
        return head, {stage: make_optimizer_for(optim, steps_per_epoch, optim.lr * m, backbone_decay)
                      for stage, m in multipliers.items()}
    if transfer.backbone_lr_mult != 1.0:
        return head, make_optimizer_for(optim, steps_per_epoch, optim.lr * transfer.backbone_lr_mult, backbone_decay)
    if optim.weight_decay and transfer.l2sp:
        head.exclude_from_weight_decay(var_list=model.backbone.weights)
    return head, None


def stage_lr_multipliers(stages, decay, backbone_mult=1.0):
    """`{stage: multiplier of the head's lr}` for layer-wise decay (BEiT, timm's
    `--layer-decay`): the stage k steps below the head trains at lr * decay**k,
    so the output stage at lr * decay and the input stage at
    lr * decay**len(stages); `backbone_mult` scales them all."""
    return {stage: backbone_mult * decay ** (len(stages) - i) for i, stage in enumerate(stages)}


def make_optimizer_for(optim, steps_per_epoch, lr=None, weight_decay=None):
    """The optimizer and schedule an `OptimConfig` describes (lr, decay overridable)."""
    total = optim.epochs * steps_per_epoch
    warmup = optim.warmup_epochs * steps_per_epoch
    schedule = make_schedule(optim.lr if lr is None else lr, optim.schedule, total, warmup)
    return make_optimizer(optim.optimizer, schedule, optim.weight_decay if weight_decay is None else weight_decay)


def regrow(optimizer, variables):
    """A copy of a built `optimizer`, built on `variables` instead.

    For a freeze policy that changes mid-run: the copy has the same
    hyperparameters, schedule, step count and weight-decay exclusions; weights
    that were already training keep their slots (momentum, Adam's moments),
    weights that start training get fresh ones, and weights that stop
    training drop theirs. A Keras optimizer cannot take new variables once
    built, hence the copy. A `MultiOptimizer` is copied with the same map,
    each of its optimizers regrown, and each set to the head's step count:
    an optimizer whose weights were all frozen took no steps, and its schedule
    starts where the head's is. A `LossScaleOptimizer` keeps its scale.

    Keras has no public way to read which slot belongs to which weight, so this
    function alone reads the optimizer's private `_trainable_variables` and its
    slot lists; `tests/test_unfreeze.py` fails if Keras changes them.
    """
    fresh = _fresh_copy(optimizer)
    fresh.build(list(variables))
    _carry_state(optimizer, fresh, optimizer.iterations)
    return fresh


def _fresh_copy(optimizer):
    """An unbuilt optimizer configured as `optimizer`, sub-optimizers included."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return keras.optimizers.LossScaleOptimizer(
            _fresh_copy(optimizer.inner_optimizer), initial_scale=optimizer.initial_scale,
            dynamic_growth_steps=optimizer.dynamic_growth_steps)
    if isinstance(optimizer, keras.optimizers.MultiOptimizer):
        old = optimizer_map(optimizer)
        copies = {id(o): _fresh_copy(o) for o in optimizer.optimizers}
        patterns = {pattern: copies[id(o)] for pattern, o in old.items()}
        return keras.optimizers.MultiOptimizer(
            keras.optimizers.OptimizerMap(copies[id(old.default_optimizer)], patterns),
            loss_scale_factor=optimizer.loss_scale_factor, name=optimizer.name)
    fresh = optimizer.__class__.from_config(optimizer.get_config())
    for attribute in ("_exclude_from_weight_decay", "_exclude_from_weight_decay_pattern"):
        if hasattr(optimizer, attribute):
            setattr(fresh, attribute, getattr(optimizer, attribute))
    return fresh


def _carry_state(old, new, steps):
    """Copy step counts, loss scale and the slots of weights both were built on."""
    if isinstance(old, keras.optimizers.LossScaleOptimizer):
        new.iterations.assign(old.iterations)
        for name in ("dynamic_scale", "step_counter"):
            getattr(new, name).assign(getattr(old, name))
        _carry_state(old.inner_optimizer, new.inner_optimizer, steps)
        return
    if isinstance(old, keras.optimizers.MultiOptimizer):
        # The head's count, which steps alone while the head trains on cached features.
        steps = optimizer_map(old).default_optimizer.iterations
        new.iterations.assign(steps)
        for old_sub, new_sub in zip(old.optimizers, new.optimizers):
            _carry_state(old_sub, new_sub, steps)
        return
    if not new.built:  # a stage that trains nothing under the new policy
        new.build([])
    new.iterations.assign(steps)
    old_index = {id(v): i for i, v in enumerate(getattr(old, "_trainable_variables", ()))}
    for name, old_slots in _slot_lists(old):
        new_slots = getattr(new, name)
        for j, variable in enumerate(new._trainable_variables):
            i = old_index.get(id(variable))
            if i is not None and old_slots[i] is not None:
                new_slots[j].assign(old_slots[i])


def optimizer_map(optimizer):
    """The `OptimizerMap` of a `MultiOptimizer`, which Keras keeps privately;
    a copy needs the same map with the same optimizers shared, which
    `get_config` loses (`tests/test_unfreeze.py` fails if Keras moves it)."""
    return optimizer._optimizer_map


def _slot_lists(optimizer):
    """`(attribute, slots)` for each per-weight slot list of a built optimizer
    (`momentums` of SGD, `_momentums` and `_velocities` of Adam, ...): a list of
    optimizer variables, one per trained weight, in the order it was built on."""
    count = len(getattr(optimizer, "_trainable_variables", ()))
    if not count:
        return []
    own = {id(v) for v in optimizer.variables}
    found = []
    for name, value in vars(optimizer).items():
        if name in ("_variables", "_trainable_variables") or not isinstance(value, (list, tuple)):
            continue
        if len(value) == count and all(v is None or id(v) in own for v in value):
            found.append((name, value))
    return found


def inner(optimizer):
    """`optimizer` without its `LossScaleOptimizer` wrapper (mixed_float16's)."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return optimizer.inner_optimizer
    return optimizer
