"""Named freeze policies for a backbone, applied per layer before `compile()`.

Policies:
    head        the backbone is frozen: feature extraction.
    full        every backbone layer trains.
    stages:N    the last N stages train (see `tfxfer backbones` for stage names).
    from:LAYER  LAYER and every layer after it train.

BatchNorm layers are frozen per layer unless `train_bn` is set, and always in the
frozen part. A Keras 3 BatchNormalization layer with `trainable=False` runs in
inference mode, so its moving statistics cannot move (keras issue 20285 is about
BN layers that are trainable but called with `training=False`).
"""

import dataclasses

import keras

from tfxfer.backbones import layer_stages
from tfxfer.errors import TfxferError, did_you_mean

__all__ = ["FreezePolicy", "parse_freeze", "apply_freeze"]


@dataclasses.dataclass(frozen=True)
class FreezePolicy:
    kind: str  # "head", "full", "stages" or "from"
    stages: int = 0
    layer: str = ""

    def __str__(self):
        if self.kind == "stages":
            return f"stages:{self.stages}"
        if self.kind == "from":
            return f"from:{self.layer}"
        return self.kind


def parse_freeze(text):
    """Parse `"head"`, `"full"`, `"stages:N"` or `"from:LAYER"`."""
    if isinstance(text, FreezePolicy):
        return text
    text = str(text).strip()
    kind, _, arg = text.partition(":")
    if kind in ("head", "full") and not arg:
        return FreezePolicy(kind)
    if kind == "stages" and arg.isdigit():
        return FreezePolicy("stages", stages=int(arg))
    if kind == "from" and arg:
        return FreezePolicy("from", layer=arg)
    raise TfxferError(
        f"Unknown freeze policy {text!r}; use head, full, stages:N (N a whole number) or from:LAYER."
    )


def apply_freeze(backbone, spec, policy, train_bn=False):
    """Set `trainable` on every layer of `backbone` according to `policy`.

    Returns:
        The names of the backbone layers that train.
    """
    policy = parse_freeze(policy)
    names = [layer.name for layer in backbone.layers]
    if policy.kind == "head":
        first = len(names)
    elif policy.kind == "full":
        first = 0
    elif policy.kind == "stages":
        if policy.stages > len(spec.stages):
            raise TfxferError(
                f"{spec.name} has {len(spec.stages)} stages ({', '.join(spec.stages)}); "
                f"stages:{policy.stages} asks for more."
            )
        stage_by_layer = layer_stages(backbone, spec)
        training_stages = set(spec.stages[len(spec.stages) - policy.stages :])
        first = next(
            (i for i, n in enumerate(names) if stage_by_layer[n] in training_stages), len(names)
        )
    else:
        if policy.layer not in names:
            raise did_you_mean(policy.layer, names, f"layer of {spec.name}")
        first = names.index(policy.layer)

    # Layer lists of keras.applications models are in topological order, so
    # "after" in the list is "after" in the network.
    backbone.trainable = True
    trained = []
    for i, layer in enumerate(backbone.layers):
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = i >= first and (train_bn or not is_bn)
        if layer.trainable and layer.weights:
            trained.append(layer.name)
    return trained
