"""PNG plots of runs and studies, drawn with matplotlib's Agg backend (no display).

Every function takes plain data (lists, arrays, dicts) and a path, writes one
PNG atomically and returns the path, so a killed process never leaves half an
image behind.
"""


import matplotlib
import matplotlib.figure
import matplotlib.ticker
import numpy as np

from tfxfer import atomic

__all__ = ["learning_curves", "confusion_matrix", "bar_chart", "top_losses", "lr_range"]

DPI = 100


def _subplots(*grid, figsize, **kwargs):
    """`(figure, axes)` of a figure outside pyplot: no global registry of figures to close."""
    figure = matplotlib.figure.Figure(figsize=figsize)
    return figure, figure.subplots(*grid, **kwargs)


def _save(figure, path):
    with atomic.replacing(path) as temporary:
        figure.savefig(temporary, dpi=DPI, format="png", bbox_inches="tight")
    return path


def learning_curves(curves, path, title="learning curves"):
    """Train and validation loss and accuracy per epoch.

    Args:
        curves: `{label: [history, ...]}`, a history being `{metric: [value per
            epoch]}` with `loss`, `val_loss`, `accuracy`, `val_accuracy`. With
            several histories per label, the line is their mean and the band
            their minimum to maximum (runs of unequal length use the epochs
            all of them reached).
    """
    figure, axes = _subplots(1, 2, figsize=(12, 4.5))
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, histories) in enumerate(curves.items()):
        color = colors[i % len(colors)]
        for ax, metric in zip(axes, ("loss", "accuracy")):
            for prefix, style in (("", "-"), ("val_", "--")):
                series = [h[prefix + metric] for h in histories if h.get(prefix + metric)]
                if not series:
                    continue
                length = min(len(s) for s in series)
                values = np.array([s[:length] for s in series], dtype=float)
                epochs = np.arange(1, length + 1)
                name = f"{label} ({'val' if prefix else 'train'})"
                ax.plot(epochs, values.mean(axis=0), style, color=color, label=name)
                if len(values) > 1:
                    ax.fill_between(epochs, values.min(axis=0), values.max(axis=0), color=color, alpha=0.15)
    for ax, metric in zip(axes, ("loss", "accuracy")):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right", ncol=2 if len(curves) > 4 else 1)
    figure.suptitle(title)
    return _save(figure, path)


def confusion_matrix(matrix, class_names, path, title="confusion matrix"):
    """Counts, rows the true class and columns the predicted one, with the
    row-normalized share as the colour."""
    matrix = np.asarray(matrix)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.6 * len(class_names) + 2)
    figure, ax = _subplots(figsize=(size + 1, size))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(class_names) <= 20:
        for r in range(matrix.shape[0]):
            for c in range(matrix.shape[1]):
                ax.text(c, r, str(matrix[r, c]), ha="center", va="center", fontsize=8,
                        color="white" if shares[r, c] > 0.6 else "black")
    figure.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    ax.set_title(title)
    return _save(figure, path)


def reliability(calibrations, path, title="reliability"):
    """Accuracy against confidence per bin, one line per `{label: calibration}`
    (`tfxfer.evaluation.calibration`); the diagonal is perfect calibration,
    and the bars underneath are the share of images in each bin."""
    figure, (ax, counts) = _subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
    for i, (label, result) in enumerate(calibrations.items()):
        used = [b for b in result["bins"] if b["count"]]
        ax.plot([b["confidence"] for b in used], [b["accuracy"] for b in used], marker="o",
                label=f"{label} (ECE {result['ece']:.3f})")
        total = max(sum(b["count"] for b in result["bins"]), 1)
        width = 1.0 / max(len(result["bins"]), 1) / max(len(calibrations), 1)
        counts.bar([b["low"] + (i + 0.5) * width for b in result["bins"]], [b["count"] / total for b in result["bins"]],
                   width=width, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title)
    counts.set_xlabel("confidence (top probability)")
    counts.set_ylabel("share")
    return _save(figure, path)


def bar_chart(labels, means, lows, highs, path, ylabel="test accuracy", title="strategies"):
    """One bar per label at its mean, with an error bar from `lows` to `highs`."""
    means, lows, highs = (np.asarray(v, dtype=float) for v in (means, lows, highs))
    figure, ax = _subplots(figsize=(max(5.0, 0.9 * len(labels) + 2), 4.5))
    x = np.arange(len(labels))
    errors = np.nan_to_num(np.vstack([means - lows, highs - means]), nan=0.0)
    ax.bar(x, means, yerr=errors, capsize=4, color="#4C72B0", alpha=0.85)
    for xi, m in zip(x, means):
        ax.annotate(f"{m:.3f}", (xi, m), ha="center", va="bottom", fontsize=8, xytext=(0, 3), textcoords="offset points")
    ax.set_xticks(x, labels, rotation=30, ha="right")
    finite = np.concatenate([lows[np.isfinite(lows)], means])
    ax.set_ylim(max(0.0, float(finite.min()) - 0.1), min(1.0, float(np.nanmax(np.append(highs, means))) + 0.05))
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title)
    return _save(figure, path)


def _overlay(ax, image, heatmap):
    """`image` with a heat-map in [0, 1] over it, jet colours, half transparent."""
    ax.imshow(np.asarray(image, dtype=np.uint8), interpolation="nearest")
    if heatmap is not None:
        ax.imshow(heatmap, cmap="jet", alpha=0.45, interpolation="bilinear", vmin=0.0, vmax=1.0)


def heatmap(image, heat, path, title=""):
    """One image with its heat-map (Grad-CAM) over it."""
    figure, ax = _subplots(figsize=(3.2, 3.5))
    _overlay(ax, image, heat)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    return _save(figure, path)


def top_losses(images, true, predicted, probabilities, losses, class_names, path, title="top losses", columns=4,
               heatmaps=None):
    """A grid of images with their true and predicted class, the predicted
    probability and the loss, in the order given (largest loss first); with
    `heatmaps` (in [0, 1], the images' size), each drawn over its image."""
    count = len(images)
    rows = max(1, -(-count // columns))
    figure, axes = _subplots(rows, columns, figsize=(2.6 * columns, 2.9 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= count:
            continue
        _overlay(ax, images[i], None if heatmaps is None else heatmaps[i])
        ax.set_title(
            f"true {class_names[true[i]]}\npred {class_names[predicted[i]]} {probabilities[i]:.2f}\nloss {losses[i]:.2f}",
            fontsize=8,
        )
    figure.suptitle(title)
    return _save(figure, path)


def lr_range(finding, path, title="learning-rate range test"):
    """Training loss (raw and smoothed) against the learning rate of a range
    test (`tfxfer.lr_find.LRFinding`), log scale, the suggested rate marked."""
    figure, ax = _subplots(figsize=(6.5, 4.2))
    ax.plot(finding.lrs, finding.losses, alpha=0.3, label="loss")
    ax.plot(finding.lrs, finding.smoothed, label="smoothed loss")
    ax.axvline(finding.suggestion, color="red", linestyle="--", label=f"suggested lr {finding.suggestion:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(figure, path)
