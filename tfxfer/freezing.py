"""Named freeze policies for a backbone, applied per layer before `compile()`.

Policies:
    head        the backbone is frozen: feature extraction.
    full        every backbone layer trains.
    stages:N    the last N stages train (see `tfxfer backbones` for stage names).
    from:LAYER  LAYER and every layer after it train.
    lora        with LoRA adapters (`tfxfer.lora`): the adapters train, the
                backbone's own weights stay frozen. A LoRA model takes `head`
                (the head alone) and `lora` only, e.g. `head@0,lora@25%`.

A schedule (`parse_unfreeze`) switches policies at epoch boundaries, e.g.
`head@0,stages:2@5,full@10`, or `head@0,full@25%` (LP-FT: a linear probe for the
first quarter of the epochs, then fine-tuning).

BatchNorm layers are frozen per layer unless `train_bn` is set, and always in the
frozen part. A Keras 3 BatchNormalization layer with `trainable=False` runs in
inference mode, so its moving statistics cannot move (keras issue 20285 is about
BN layers that are trainable but called with `training=False`).
"""

import dataclasses
import math

import keras
import numpy as np

from tfxfer.backbones.registry import backbone_units
from tfxfer.errors import TfxferError, did_you_mean
from tfxfer.lora import ADAPTER_WEIGHTS

__all__ = ["FreezePolicy", "parse_freeze", "apply_freeze", "Phase", "parse_unfreeze", "resolve_phases", "phase_at", "UnfreezeSchedule", "resolve_train_bn"]


@dataclasses.dataclass(frozen=True)
class FreezePolicy:
    kind: str  # "head", "full", "stages", "from" or "lora"
    stages: int = 0
    layer: str = ""

    def __str__(self):
        if self.kind == "stages":
            return f"stages:{self.stages}"
        if self.kind == "from":
            return f"from:{self.layer}"
        return self.kind


def parse_freeze(text):
    """Parse `"head"`, `"full"`, `"stages:N"`, `"from:LAYER"` or `"lora"`."""
    if isinstance(text, FreezePolicy):
        return text
    text = str(text).strip()
    kind, _, arg = text.partition(":")
    if kind in ("head", "full", "lora") and not arg:
        return FreezePolicy(kind)
    if kind == "stages" and arg.isdigit():
        return FreezePolicy("stages", stages=int(arg))
    if kind == "from" and arg:
        return FreezePolicy("from", layer=arg)
    raise TfxferError(
        f"Unknown freeze policy {text!r}; use head, full, stages:N (N a whole number), from:LAYER or (with --lora) lora."
    )


def apply_freeze(backbone, spec, policy, train_bn=False):
    """Set `trainable` on every layer of `backbone` according to `policy`
    (`lora` freezes it all, as `head`: the adapters are set per weight by
    `tfxfer.lora.set_trainable`).

    Returns:
        The names of the backbone layers that train.
    """
    policy = parse_freeze(policy)
    if policy.kind == "lora" and not any(w.path.rpartition("/")[2] in ADAPTER_WEIGHTS for w in backbone.weights):
        raise TfxferError("The freeze policy lora trains LoRA adapters, and this backbone has none; give --lora RANK "
                          "(lora=RANK), or another policy.")
    units = backbone_units(backbone, spec)
    names = [layer.name for layer, _ in units]
    if policy.kind in ("head", "lora"):
        first = len(names)
    elif policy.kind == "full":
        first = 0
    elif policy.kind == "stages":
        if policy.stages > len(spec.stages):
            raise TfxferError(
                f"{spec.name} has {len(spec.stages)} stages ({', '.join(spec.stages)}); "
                f"stages:{policy.stages} asks for more."
            )
        training_stages = set(spec.stages[len(spec.stages) - policy.stages :])
        first = next((i for i, (_, stage) in enumerate(units) if stage in training_stages), len(names))
    else:
        if policy.layer not in names:
            raise did_you_mean(policy.layer, names, f"layer of {spec.name}")
        first = names.index(policy.layer)

    # Layer lists of keras.applications models are in topological order, so
    # "after" in the list is "after" in the network.
    backbone.trainable = True
    trained = []
    for i, (layer, _) in enumerate(units):
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = i >= first and (train_bn or not is_bn)
        if layer.trainable and layer.weights:
            trained.append(layer.name)
    return trained


@dataclasses.dataclass(frozen=True)
class Phase:
    """A freeze policy from an epoch on: `start` epochs, or `start`% of the run."""

    policy: FreezePolicy
    start: float
    percent: bool = False

    def __str__(self):
        return f"{self.policy}@{self.start:g}{'%' if self.percent else ''}"

    def first_epoch(self, epochs):
        """The 0-based epoch the phase begins at, in a run of `epochs` epochs."""
        if not self.percent:
            return int(self.start)
        # Rounded half up; a phase after 0% starts after at least one epoch.
        first = math.floor(self.start * epochs / 100 + 0.5)
        return max(first, 1) if self.start > 0 else 0


def parse_unfreeze(text):
    """Parse a schedule `"POLICY@EPOCH,..."`; EPOCH is a whole number or a percentage."""
    phases = []
    for part in str(text).split(","):
        policy, at, start = part.strip().rpartition("@")
        percent = start.endswith("%")
        number = start[:-1] if percent else start
        if not at or not number.replace(".", "", 1).isdigit() or (not percent and not number.isdigit()):
            raise TfxferError(
                f"Unfreeze phase {part.strip()!r} is not POLICY@EPOCH or POLICY@PERCENT%; "
                "write e.g. head@0,full@5 or head@0,full@25%."
            )
        phases.append(Phase(parse_freeze(policy), float(number), percent))
    if phases[0].start != 0:
        raise TfxferError(f"Unfreeze schedule {text!r} must start with a phase at 0, e.g. head@0.")
    if any(p.percent and p.start > 100 for p in phases):
        raise TfxferError(f"Unfreeze schedule {text!r} has a phase past 100% of the run.")
    return phases


def resolve_phases(phases, epochs):
    """`[(first_epoch, policy)]` for a run of `epochs` epochs; starts must increase."""
    resolved = [(p.first_epoch(epochs), p.policy) for p in phases]
    starts = [start for start, _ in resolved]
    if starts != sorted(set(starts)):
        described = ", ".join(f"{p} -> epoch {s}" for p, s in zip(phases, starts))
        raise TfxferError(
            f"Unfreeze phases must start at increasing epochs, and in a run of {epochs} epochs they do not ({described})."
        )
    return resolved


def phase_at(resolved, epoch):
    """The policy in force at 0-based `epoch`."""
    return [policy for start, policy in resolved if start <= epoch][-1]


class UnfreezeSchedule(keras.callbacks.Callback):
    """Switches the model's freeze policy at the start of each phase's first
    epoch (`TransferModel.set_freeze`, which keeps the optimizer state of the
    weights that were training), and retraces the training step."""

    def __init__(self, resolved, log=print):
        super().__init__()
        self.resolved, self.log = resolved, log

    def on_epoch_begin(self, epoch, logs=None):
        policy = phase_at(self.resolved, epoch)
        if str(policy) != self.model.freeze:
            self.model.set_freeze(policy)
            self.model.make_train_function(force=True)
            trainable = sum(int(np.prod(w.shape)) for w in self.model.trainable_weights)
            self.log(f"epoch {epoch + 1}: freeze {policy}, {trainable:,} trainable parameters")


def resolve_train_bn(mode, weights):
    """`(train, reason)` for `--train-bn auto|on|off` and the weights a run starts from.

    `auto` trains BatchNorm from random weights, whose running statistics were
    never learned and are not worth keeping, and freezes it from pretrained
    weights, whose statistics small target batches would only blur.
    """
    if mode in (True, "on"):
        return True, "--train-bn on"
    if mode in (False, "off"):
        return False, "--train-bn off"
    if weights == "none":
        return True, "auto: random weights have no statistics worth keeping"
    return False, "auto: pretrained statistics are kept"
