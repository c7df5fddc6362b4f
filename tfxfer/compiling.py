"""The run's model as training builds it: the network with its starting freeze
policy, its loss and metrics, and its optimizers (`tfxfer.optim`).
`finetune` and `lr-find` build it alike, so a range test sees the run's setup."""

from tfxfer import runs
from tfxfer.losses import Crossentropy
from tfxfer.metrics import Accuracy, MacroF1
from tfxfer.model import build_model
from tfxfer.optim import make_optimizers

__all__ = ["compiled_model", "compile_run", "objective"]


def compiled_model(config, info, image_size, train_bn):
    """The run's model, with the freeze policy it starts with, compiled with its optimizers."""
    model = build_model(
        config.model.backbone, num_classes=info.num_classes, weights=config.model.weights,
        image_size=image_size, freeze=config.first_policy(), train_bn=train_bn,
        bn_momentum=config.model.bn_momentum, dropout=config.transfer.dropout, l2sp=config.transfer.l2sp,
        l2sp_scope=config.transfer.l2sp_scope, head_l2=config.transfer.head_l2, class_names=info.class_names,
        lora=config.transfer.lora, lora_alpha=config.transfer.lora_alpha, lora_targets=config.transfer.lora_targets,
        lora_train=config.transfer.lora_train, speedups=config.run.cpu_speedups, **_probe(config, info),
    )
    compile_run(model, config, runs.steps_per_epoch(config, info))
    return model


def _probe(config, info):
    transfer = config.transfer
    if transfer.probe != "knn":
        return {"probe": transfer.probe}
    return {"probe": "knn", "knn_bank": min(transfer.knn_bank, info.num_examples["train"]), "knn_k": transfer.knn_k,
            "knn_temperature": transfer.knn_temperature}


def objective(config, num_classes):
    """The loss and the metrics: class ids or (after mixup, cutmix) class
    probabilities as labels; macro-F1 when it picks the best epoch."""
    metrics = [Accuracy()]
    if config.transfer.monitor == "val_macro_f1":
        metrics.append(MacroF1(num_classes))
    return Crossentropy(num_classes, config.transfer.label_smoothing), metrics


def compile_run(model, config, steps_per_epoch):
    """Compile `model` with the loss, metrics and optimizers of `config`."""
    head_optimizer, backbone_optimizer = make_optimizers(config, model, steps_per_epoch)
    loss, metrics = objective(config, model.num_classes)
    model.compile(
        optimizer=head_optimizer,
        backbone_optimizer=backbone_optimizer,
        loss=loss,
        metrics=metrics,
        jit_compile=config.run.jit_compile,
    )
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_weights)
