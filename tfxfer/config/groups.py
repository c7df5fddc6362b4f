"""The option groups that `finetune`, `pretrain` and `study` share: data,
model, transfer, optimizer and run, with the names a user can type for each
choice and the `--recipe` presets."""

import dataclasses
import os
from typing import Optional

from tfxfer.config.options import option
from tfxfer.errors import TfxferError
from tfxfer.runtime import PRECISIONS

__all__ = [
    "DataConfig", "ModelConfig", "TransferConfig", "OptimConfig", "RunConfig",
    "MONITORS", "OPTIMIZERS", "SCHEDULES", "SCOPES", "DISTRIBUTE", "BN_MODES", "EXPORT_FORMATS", "RECIPES",
]

# The names a user can type, declared here so that `tfxfer --help` and the
# config need no TensorFlow; the modules that implement them import these.
MONITORS = ("val_accuracy", "val_loss", "val_macro_f1")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine")
SCOPES = ("kernels", "all")  # L2-SP: kernels (as the paper) or all weights
DISTRIBUTE = ("none", "mirrored", "multiworker")
BN_MODES = ("auto", "on", "off")  # --train-bn (tfxfer.freezing.resolve_train_bn)
# The formats `tfxfer.export` registers; the command names a wrong one before TensorFlow loads.
EXPORT_FORMATS = ("saved_model", "onnx", "litert")
# `--recipe NAME` fills the options the user left unset. `tuned` is the defaults
# below (SGD, lr 1e-2, cosine decay, no augmentation), which the recipe study of
# STUDIES.md picked over `classic` (SGD, lr 1e-3, constant), the defaults they replaced.
RECIPES = {
    "tuned": {},
    "classic": {"optimizer": "sgd", "lr": 1e-3, "schedule": "constant", "warmup_epochs": 0.0, "augment": "none",
                "lr_decay": 1.0, "ema": None},
}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: Optional[str] = option(None, "Built-in dataset (digits) or a tensorflow-datasets name, e.g. cifar10.")
    data_dir: Optional[str] = option(
        None, "Image folder: one sub-folder per class, or train/ (training/) plus val/ (valid/, validation/, dev/) "
        "and/or test/ (testing/), in any case.", path=True
    )
    csv: Optional[str] = option(
        None, "CSV of labelled images: columns path and label, optionally split (train, val, test); paths relative "
        "to the CSV's folder; separated by commas, semicolons, tabs or |.", path=True
    )
    csv_path_column: str = option("path", "Column of the --csv that holds each image's path.")
    csv_label_column: str = option("label", "Column of the --csv that holds each image's label.")
    tfrecord: Optional[str] = option(
        None, "TFRecord files of tf.train.Example records, plain or GZIP: a GLOB of training files, or SPLIT=GLOB "
        "pairs separated by commas (train, val, test).", path=True
    )
    tfrecord_image_key: str = option("image", "Feature of a --tfrecord record that holds the encoded image.")
    tfrecord_label_key: str = option("label", "Feature of a --tfrecord record that holds the label (integer or string).")
    tfds_data_dir: Optional[str] = option(
        None, "Folder with prepared tensorflow-datasets data (the offline route).", path=True
    )
    tfds_manual_dir: Optional[str] = option(
        None, "Folder with the archives tensorflow-datasets would download for --dataset (for cifar10: "
        "cifar-10-binary.tar.gz), put there by hand; tfds prepares the dataset from them, checksums checked.", path=True
    )
    train_split: str = option("train", "tfds split to train on (slicing allowed, e.g. 'train[:50%]').")
    val_split: Optional[str] = option(None, "tfds validation split; default 'validation', else carved from train.")
    test_split: Optional[str] = option(None, "tfds test split; default 'test' when the dataset has one.")
    val_fraction: float = option(0.1, "Share of train carved out (per class) as validation when there is none.")
    classes: Optional[str] = option(None, "Comma-separated class names: use only these classes, in this order.")
    labels_per_class: Optional[int] = option(None, "Seeded, stratified sample of N labelled training images per class.")
    max_train_examples: Optional[int] = option(None, "Train on a seeded sample of this many images.")
    folds: Optional[int] = option(None, "K: validate on one fold of a seeded, stratified K-fold split of the labelled training images.")
    fold: int = option(0, "With --folds: which fold (0..K-1) is the validation set.")
    augment: str = option(
        "none", "Training augmentation: none, or NAME[:VALUE] items separated by commas from flip, crop[:pad share], "
        "rotate[:degrees], zoom[:share], color[:strength], randaugment[:strength], mixup[:alpha], cutmix[:alpha]; "
        "flip_crop = flip,crop. Keras layers in the tf.data pipeline, seeded."
    )
    allow_leaks: bool = option(
        False, "Go on when test images are also training images (the pre-flight's leak check stops the run "
        "otherwise); the leak is still reported and kept in metrics.json."
    )

    def validate(self):
        if sum(x is not None for x in (self.dataset, self.data_dir, self.csv, self.tfrecord)) != 1:
            raise TfxferError("Give exactly one of --dataset NAME, --data-dir FOLDER, --csv FILE or --tfrecord GLOB.")
        # Here, not at the top: tfxfer.data.augment (where the augmentations are built) loads TensorFlow.
        from tfxfer.data.augment import parse_augment

        parse_augment(self.augment)
        if not 0.0 < self.val_fraction < 1.0:
            raise TfxferError(f"val_fraction must be between 0 and 1, got {self.val_fraction}.")
        for key in ("labels_per_class", "max_train_examples"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise TfxferError(f"{key} must be at least 1, got {getattr(self, key)}.")
        if self.folds is not None and not (self.folds >= 2 and 0 <= self.fold < self.folds):
            raise TfxferError(f"--folds must be at least 2 and --fold in 0..folds-1, got folds {self.folds}, fold {self.fold}.")

    def source_name(self):
        if self.csv:
            return os.path.splitext(os.path.basename(self.csv))[0]
        if self.tfrecord:
            return "tfrecord"
        return self.dataset or os.path.basename(os.path.normpath(self.data_dir or "data"))

    def source(self):
        """The keyword arguments of `tfxfer.data.load_splits` that name the data."""
        return {"name": self.dataset, "data_dir": self.data_dir, "csv": self.csv, "tfrecord": self.tfrecord,
                "tfrecord_keys": (self.tfrecord_image_key, self.tfrecord_label_key),
                "tfds_manual_dir": self.tfds_manual_dir, "csv_columns": (self.csv_path_column, self.csv_label_column)}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    backbone: str = option("resnet50", "Backbone name; see `tfxfer backbones`.")
    weights: str = option("imagenet", "imagenet, none, a weights file, or a pretrain/finetune run folder.", path=True)
    image_size: Optional[int] = option(None, "Square input size in pixels (default: the backbone's; 32 works).")
    bn_momentum: Optional[float] = option(None, "Momentum of BatchNorm moving averages (default: the backbone's).")

    def validate(self):
        if self.image_size is not None and self.image_size < 28:
            raise TfxferError(f"image_size must be at least 28, got {self.image_size}.")
        if self.bn_momentum is not None and not 0.0 <= self.bn_momentum < 1.0:
            raise TfxferError(f"bn_momentum must be in [0, 1), got {self.bn_momentum}.")


@dataclasses.dataclass(frozen=True)
class TransferConfig:
    recipe: str = option(
        "tuned", "How the training goes, for the options not given: tuned (the defaults, chosen by a study) or "
        "classic (SGD, lr 1e-3, constant, no augmentation).", tuple(RECIPES)
    )
    strategy: Optional[str] = option(
        None, "Named strategy: scratch, head, full, stages:N, lp-ft, l2sp@ALPHA or lora:RANK, each with an optional +bn; "
        "it sets freeze, unfreeze, l2sp, lora and train_bn (scratch also weights: none)."
    )
    freeze: str = option(
        "full", "head, full, stages:N or from:LAYER; with --lora the adapters train (to start them later: --unfreeze "
        "head@0,lora@25%)."
    )
    unfreeze: Optional[str] = option(
        None, "Freeze schedule by epoch, e.g. head@0,full@5 or head@0,full@25% (LP-FT), or with --lora head@0,lora@25% "
        "(the adapters join later); its first policy replaces --freeze."
    )
    train_bn: str = option(
        "auto", "BatchNorm of the training part: auto (trains from random weights, frozen from pretrained ones), on "
        "(always trains) or off (always frozen, in inference mode). A bare --train-bn is on.", BN_MODES
    )
    dropout: float = option(0.0, "Dropout rate before the new head.")
    top_k: int = option(5, "Also report top-K accuracy (when K is below the number of classes).")
    calibrate: bool = option(
        False, "Temperature scaling: fit a temperature on the validation split after training and fold it into the "
        "head, so the exports serve calibrated probabilities (accuracy is unchanged)."
    )
    l2sp: float = option(
        0.0, "L2-SP alpha: pull the backbone toward its starting weights (Li et al. 2018); with --lora, "
        "alpha * ||(lora_alpha / rank) * A @ B||^2 per adapter: the merged kernel's distance from its start."
    )
    l2sp_scope: str = option("kernels", "Weights L2-SP pulls: kernels (as the paper) or all.", SCOPES)
    head_l2: float = option(0.0, "Plain L2 beta on the new head's kernel.")
    backbone_lr_mult: float = option(1.0, "Backbone learning rate = lr * this, through its own optimizer.")
    lr_decay: float = option(
        1.0, "Layer-wise learning-rate decay D: the backbone stage k steps below the head trains at lr * D^k "
        "(one optimizer per stage; see tfxfer backbones for the stages). 1 turns it off."
    )
    ema: Optional[float] = option(
        None, "Weight EMA decay, e.g. 0.999: validation, the best epoch, the test metrics and the export use the "
        "moving average of the weights."
    )
    feature_cache: str = option(
        "auto", "While the backbone is frozen, train the head on features computed once: auto (when not augmenting), "
        "memory, a folder (kept across runs), or off.", path=True
    )
    label_smoothing: float = option(0.0, "Label smoothing epsilon of the cross-entropy (Szegedy et al. 2016).")
    class_weight: Optional[str] = option(
        None, "balanced: weigh each class's loss by n / (classes * n_class) of the training images.", ("balanced",)
    )
    monitor: str = option("val_accuracy", "Validation metric that picks the best epoch (and early stopping).", MONITORS)
    early_stopping: Optional[int] = option(None, "Stop after this many epochs without a better --monitor value.")
    lora: Optional[int] = option(
        None, "LoRA rank: low-rank adapters on the backbone's target layers; only they and the head train, the "
        "backbone's own weights stay as loaded, and the exports hold them merged."
    )
    lora_alpha: Optional[float] = option(None, "LoRA scale: the adapters add (alpha / rank) * A @ B. [default: the rank]")
    lora_targets: Optional[str] = option(
        None, "Layers LoRA adapts: stages:N (the convolutions of the last N stages) or layer names separated by "
        "commas. [default: the backbone's: attention query and value, Swin's qkv, a CNN's last stage]"
    )
    lora_train: str = option("none", "With --lora: none, or norms (the backbone's normalisation scales and offsets "
                             "and its biases train too).", ("none", "norms"))
    probe: Optional[str] = option(
        None, "Train no backbone: knn (cosine k-NN votes over the training features, as DINO evaluates) or linear "
        "(logistic regression, its L2 strength chosen on the validation split), on features computed once.",
        ("knn", "linear")
    )
    knn_k: int = option(20, "With --probe knn: the neighbours that vote.")
    knn_temperature: float = option(0.07, "With --probe knn: a neighbour votes with weight exp(cosine similarity / T).")
    knn_bank: int = option(
        20000, "With --probe knn: the most training images the k-NN head keeps (inside the SavedModel, images x "
        "features x 4 bytes); above it, a class-stratified sample."
    )

    def validate(self):
        from tfxfer.freezing import parse_freeze, parse_unfreeze  # here, not at the top: it loads TensorFlow

        parse_freeze(self.freeze)
        if self.unfreeze:
            parse_unfreeze(self.unfreeze)
        _at_least(self, ("l2sp", "head_l2", "dropout", "label_smoothing"), 0.0)
        if not self.dropout < 1.0:
            raise TfxferError(f"dropout must be below 1, got {self.dropout}.")
        if not self.label_smoothing < 1.0:
            raise TfxferError(f"label_smoothing must be below 1, got {self.label_smoothing}.")
        if self.early_stopping is not None and self.early_stopping < 1:
            raise TfxferError(f"early_stopping must be at least 1 epoch, got {self.early_stopping}.")
        if not self.backbone_lr_mult > 0:
            raise TfxferError(f"backbone_lr_mult must be > 0, got {self.backbone_lr_mult}.")
        if self.ema is not None and not 0 < self.ema < 1:
            raise TfxferError(f"ema must be between 0 and 1, e.g. 0.999, got {self.ema}.")
        if not 0 < self.lr_decay <= 1:
            raise TfxferError(f"lr_decay must be above 0 and at most 1, got {self.lr_decay}.")
        if self.top_k < 1:
            raise TfxferError(f"top_k must be at least 1, got {self.top_k}.")
        self._validate_probe()
        policies = [parse_freeze(self.freeze)] + [p.policy for p in parse_unfreeze(self.unfreeze or "head@0")]
        if self.lora is None:
            given = [f"--{k.replace('_', '-')}" for k in ("lora_alpha", "lora_targets") if getattr(self, k) is not None]
            if given or self.lora_train != "none":
                raise TfxferError(f"{', '.join(given) or '--lora-train'} needs --lora RANK.")
            if any(p.kind == "lora" for p in policies):
                raise TfxferError("The freeze policy lora trains LoRA adapters; give --lora RANK, or another policy.")
            return
        if self.lora < 1:
            raise TfxferError(f"--lora takes a rank of at least 1, got {self.lora}.")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise TfxferError(f"--lora-alpha must be > 0, got {self.lora_alpha}.")
        others = [str(p) for p in policies[1:] if p.kind not in ("head", "lora")]
        if others:
            raise TfxferError(f"With --lora, --unfreeze takes the phases head and lora only, e.g. head@0,lora@25%; "
                              f"drop {others[0]}.")


    def _validate_probe(self):
        if self.knn_k < 1 or self.knn_bank < 1:
            raise TfxferError(f"knn_k and knn_bank must be at least 1, got {self.knn_k} and {self.knn_bank}.")
        if not self.knn_temperature > 0:
            raise TfxferError(f"knn_temperature must be > 0, got {self.knn_temperature}.")
        if self.probe is None:
            return
        clashes = [flag for flag, given in (("--lora", self.lora is not None), ("--unfreeze", self.unfreeze),
                                            ("--l2sp", self.l2sp), ("--ema", self.ema is not None),
                                            ("--calibrate", self.calibrate and self.probe == "knn")) if given]
        if clashes:
            raise TfxferError(f"--probe {self.probe} trains no backbone and takes no gradient step; drop "
                              f"{', '.join(clashes)}.")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    optimizer: str = option("sgd", "sgd (momentum 0.9), adam or adamw.", OPTIMIZERS)
    lr: float = option(
        1e-2, "Learning rate (of the head, when the backbone has its own); auto runs the range test of "
        "tfxfer lr-find first and records its suggestion in the run's config.", auto=True
    )
    weight_decay: float = option(0.0, "Optimizer weight decay; never on the backbone while L2-SP is on.")
    schedule: str = option("cosine", "Learning-rate schedule (cosine decays to 0 after --warmup-epochs).", SCHEDULES)
    warmup_epochs: float = option(0.0, "Linear warmup length before the cosine decay.")
    epochs: int = option(5, "Number of epochs (--time-budget picks it instead).")
    time_budget: Optional[str] = option(None, "Training time, e.g. 90s, 20m, 1.5h: picks the epochs that fit.")
    batch_size: int = option(64, "Batch size.")

    def validate(self):
        _at_least(self, ("weight_decay", "warmup_epochs"), 0.0)
        for key in ("lr", "epochs", "batch_size"):
            if getattr(self, key) != "auto" and not getattr(self, key) > 0:
                raise TfxferError(f"{key} must be > 0, got {getattr(self, key)}.")
        if self.time_budget is not None:
            from tfxfer.budget import parse_duration  # here, not at the top: it loads TensorFlow

            parse_duration(self.time_budget)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    seed: int = option(0, "Seeds Python, NumPy, TensorFlow, the data selection, order and augmentation.")
    deterministic: bool = option(False, "TF op determinism: identical histories on any device, at a cost (README).")
    precision: str = option("auto", "auto: bfloat16 where the hardware has it, else float32.", PRECISIONS)
    jit_compile: bool = option(False, "Compile the training step with XLA (measure first on CPU).")
    cpu_speedups: str = option("auto", "Training-time CPU speed-ups: auto (those measured to pay on this CPU kind), "
                               "force (all), off.", ("auto", "off", "force"))
    distribute: str = option("none", "none; mirrored: the GPUs of this machine; multiworker: the workers of TF_CONFIG (README).", DISTRIBUTE)
    tensorboard: bool = option(False, "Write TensorBoard logs to the run's tensorboard/ folder (scalars, L2-SP, learning rate, a batch of images).")
    tracking: Optional[str] = option(None, "Experiment tracker to log the run to: mlflow (or give --mlflow).", ("mlflow",))
    mlflow: Optional[str] = option(
        None, "Track the run in MLflow: a bare --mlflow logs to ./mlflow.db with artifacts in ./mlruns (open them "
        "with `mlflow ui` there), --mlflow URI to that tracking server or store, --mlflow FOLDER to a folder store.",
        path=True
    )
    run_name: Optional[str] = option(None, "Run folder name under --output-dir (default: from data, backbone and method).")
    output_dir: str = option("saved_models", "Where run folders go.", path=True)

    def __post_init__(self):
        if self.mlflow and self.tracking is None:
            # --mlflow URI alone asks for MLflow. Set while the group is built (frozen afterwards), so every
            # copy and every reader sees it, validated or not.
            object.__setattr__(self, "tracking", "mlflow")

    def validate(self):
        if self.jit_compile and self.deterministic:
            raise TfxferError(
                "--jit-compile needs --no-deterministic: Keras silently turns XLA off while TF op determinism is on."
            )


def _at_least(group, keys, low):
    for key in keys:
        value = getattr(group, key)
        if not value >= low:  # also catches NaN
            raise TfxferError(f"{key} must be >= {low:g}, got {value}.")
