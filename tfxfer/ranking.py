"""Ranking pretrained candidates before fine-tuning, with LogME.

LogME (You, Liu, Wang, Long, "LogME: Practical Assessment of Pre-trained
Models for Transfer Learning", ICML 2021) scores a frozen feature extractor on
a labelled target set by the log marginal likelihood (evidence) of a Bayesian
linear model from its features to each one-hot label column, per image and
averaged over the classes. The prior precision alpha and the noise precision
beta come from MacKay's fixed-point iteration, run as the paper's procedure
runs it: at most 11 updates, stopping once both change by under 0.1%. With
more images than features it converges to the evidence's maximum; with fewer,
a class can be fit exactly and the iteration drifts toward a noise-free
model (beta without bound), which the update limit stops. One SVD of the
features serves every class and every update.
Higher is better; scores compare candidates on one target set, not across
sets.
"""

import dataclasses
import os
import time

import numpy as np

from tfxfer import runs
from tfxfer.backbones import get_backbone
from tfxfer.backbones.pretrained import find_pretrained
from tfxfer.config import expand_path, load_config
from tfxfer.errors import TfxferError
from tfxfer.feature_cache import extract_features
from tfxfer.model import build_model

__all__ = ["logme", "evidence", "Candidate", "parse_candidate", "rank"]

MAX_UPDATES, TOLERANCE = 11, 1e-3


def logme(features, labels, details=False):
    """The LogME score of `features` [N, D] for integer `labels` [N].

    With `details`, also `[(alpha, beta)]`, the maximizing precisions per class.
    """
    f = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = s**2  # eigenvalues of F^T F (the nonzero part)
    scores, precisions = [], []
    for k in np.unique(labels):
        t = (labels == k).astype(np.float64)
        z = u.T @ t
        outside = max(float(t @ t - z @ z), 0.0)  # |t|^2 outside the span of F's columns
        alpha, beta = 1.0, 1.0
        for _ in range(MAX_UPDATES):
            gamma = np.sum(beta * sigma / (alpha + beta * sigma))
            m2, residual = _norms(alpha, beta, sigma, z, outside)
            new_alpha, new_beta = gamma / max(m2, 1e-300), (n - gamma) / max(residual, 1e-300)
            done = abs(new_alpha / alpha - 1) < TOLERANCE and abs(new_beta / beta - 1) < TOLERANCE
            alpha, beta = new_alpha, new_beta
            if done:
                break
        m2, residual = _norms(alpha, beta, sigma, z, outside)
        log_det = np.sum(np.log(alpha + beta * sigma)) + (d - len(sigma)) * np.log(alpha)
        value = (n * np.log(beta) + d * np.log(alpha) - n * np.log(2 * np.pi) - beta * residual - alpha * m2
                 - log_det) / 2
        scores.append(value / n)
        precisions.append((float(alpha), float(beta)))
    score = float(np.mean(scores))
    return (score, precisions) if details else score


def _norms(alpha, beta, sigma, z, outside):
    """`(|m|^2, |F m - t|^2)` for the posterior mean m, in the SVD's basis."""
    shrink = alpha + beta * sigma
    return float(np.sum(beta**2 * sigma * z**2 / shrink**2)), float(np.sum((alpha * z / shrink) ** 2) + outside)


def evidence(features, targets, alpha, beta):
    """The log evidence per image of one target column, computed directly
    (a D x D solve): the definition that `logme` evaluates through the SVD."""
    f = np.asarray(features, dtype=np.float64)
    t = np.asarray(targets, dtype=np.float64)
    n, d = f.shape
    a = alpha * np.eye(d) + beta * f.T @ f
    m = beta * np.linalg.solve(a, f.T @ t)
    _, log_det = np.linalg.slogdet(a)
    value = (n * np.log(beta) + d * np.log(alpha) - n * np.log(2 * np.pi) - beta * np.sum((f @ m - t) ** 2)
             - alpha * m @ m - log_det) / 2
    return value / n


@dataclasses.dataclass
class Candidate:
    """A backbone to score: a registry name with weights, or a run folder."""

    text: str
    backbone: str
    weights: str
    image_size: int


def parse_candidate(text, image_size=None):
    """`NAME` (its default weights, `imagenet`), `NAME:none`, `NAME:WEIGHTS`,
    or the folder of a `tfxfer pretrain`/`finetune` run."""

    if os.path.isdir(text):
        found = find_pretrained(text)
        if not found:
            raise TfxferError(f"{text!r} is a folder but not a tfxfer run folder; pass a backbone name, "
                              "NAME:none, or the folder of a pretrain or finetune run.")
        spec = found[1]
        return Candidate(text, spec["backbone"], text, int(spec["image_size"]))
    name, _, weights = text.partition(":")
    if os.sep in name or name.startswith(("~", ".")):
        raise TfxferError(f"No run folder {text!r}; pass the folder of a pretrain or finetune run, a backbone name, "
                          "or NAME:none.")
    spec = get_backbone(name)
    if not weights and spec.source.startswith("none"):
        raise TfxferError(f"{name} has no pretrained weights of its own to score; rank {name}:none for random weights, "
                          f"{name}:FILE for a weights file, or the folder of a tfxfer pretrain run.")
    weights = expand_path(weights) if weights not in ("", "none", "imagenet") else weights
    return Candidate(text, name, weights or "imagenet", int(image_size or spec.default_size))


def _in_rank_terms(error, candidate):
    """A weights error of `build_model` advises `--weights`, which rank does not have:
    the same sentence, with the advice in candidate syntax."""
    reason = str(error).split(";")[0].rstrip(".")
    name = candidate.backbone
    return TfxferError(f"{reason}; to score {name}, rank {name}:FILE with a local weights file, {name}:none for "
                       "random weights, or the folder of a tfxfer pretrain run.")


def rank(candidates, data_options, image_size=None, log=print):
    """Score each candidate text on the labelled training images (train and
    validation splits) of the data `data_options` describes (finetune's data
    options); returns a list of dicts, best first."""
    import keras

    parsed = [parse_candidate(text, image_size) for text in candidates]
    results, data = [], {}
    for candidate in parsed:
        if candidate.image_size not in data:
            config = load_config(backbone=candidate.backbone, image_size=candidate.image_size, **data_options)
            train, val, _, info, _ = runs.load_data(config, log, augment="none")
            data[candidate.image_size] = (train, val, info, config)
        train, val, info, config = data[candidate.image_size]
        keras.backend.clear_session()
        runs.seed_everything(config.run.seed)  # a random candidate scores the same every time
        try:
            model = build_model(candidate.backbone, num_classes=info.num_classes, weights=candidate.weights,
                                image_size=candidate.image_size, freeze="head")
        except TfxferError as error:
            raise _in_rank_terms(error, candidate) if "--weights" in str(error) else error from None
        started = time.perf_counter()
        features, labels = map(np.concatenate, zip(extract_features(model, train), extract_features(model, val)))
        seconds = time.perf_counter() - started
        score = logme(features, labels)
        results.append({"candidate": candidate.text, "logme": score, "feature_seconds": round(seconds, 2),
                        "images": int(len(labels)), "params": int(model.backbone.count_params()),
                        "image_size": candidate.image_size, "feature_dim": int(features.shape[1])})
        log(f"{candidate.text}: LogME {score:.4f} ({len(labels)} images, {features.shape[1]} features, {seconds:.1f} s)")
    return sorted(results, key=lambda r: -r["logme"])
