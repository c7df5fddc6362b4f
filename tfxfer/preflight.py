"""Pre-flight: the data checked before a run trains or evaluates on it.

What no metric shows: a test image that is also a training image makes the
test accuracy a lie, and one image under two labels trains on both. The checks:

* exact duplicates within and across splits, by a BLAKE2b digest of each
  image's bytes: the encoded file for image folders and CSVs (each distinct path
  read once), the decoded pixels as the pipeline yields them for tfds and
  TFRecord records and in-memory arrays;
* leaks: test images whose bytes are also in train (the same file listed in
  both, or a copy). A leak is an error unless `allow_leaks`;
* the same image (same path or same bytes) under two labels;
* empty, tiny (under `TINY_CLASS`) and imbalanced (largest / smallest above
  `IMBALANCE_RATIO`) training classes;
* near-duplicates across train and test in feature space (`near_duplicates`):
  cosine similarity of centred features above `NEAR_DUPLICATE_COSINE`, where a
  run trains on cached features with a `--feature-cache` folder, which then
  keeps the test split's features too (`check_cached_features`).

Everything but a leak is a warning. `check` returns a JSON-able report, which a
run keeps in `metrics.json` under `preflight`; `describe` is its block of the
start output.
"""

import hashlib
import os
import time

import numpy as np

from tfxfer.errors import TfxferError
from tfxfer.feature_cache import FEATURE_CACHE, cached_features

__all__ = ["IMBALANCE_RATIO", "NEAR_DUPLICATE_COSINE", "TINY_CLASS", "check", "check_cached_features", "describe",
           "findings", "near_duplicates"]

TINY_CLASS = 5
IMBALANCE_RATIO = 10.0
NEAR_DUPLICATE_COSINE = 0.98
EXAMPLES = 3  # examples kept per finding
SPLITS = ("train", "val", "test")
PAIRS = (("train", "val"), ("train", "test"), ("val", "test"))


def check(splits, info, allow_leaks=False):
    """The pre-flight report of `splits` (`tfxfer.data.splits.Split`s by split
    name) as the run uses them, after selection; `info` is their `DatasetInfo`.

    Raises `TfxferError` for a leak between train and test unless `allow_leaks`."""
    started = time.perf_counter()
    read = {}  # path -> digest: a file listed in several splits is read once
    items = {key: _digests(splits[key], read) for key in SPLITS if splits.get(key) is not None}
    groups = {}
    for key, (digests, labels, _) in items.items():
        for index, (digest, label) in enumerate(zip(digests, labels)):
            groups.setdefault(digest, []).append((key, int(label), index))
    name = _namer(items)
    duplicates, conflicts = {}, _Finding()
    for group in groups.values():
        if len(group) < 2:
            continue
        by_split = {}
        for key, label, index in group:
            by_split.setdefault(key, []).append(name(key, index))
        for key, members in by_split.items():
            if len(members) > 1:
                duplicates.setdefault(key, _Finding()).add(len(members) - 1, _same(members[0], members[1]))
        for first, second in PAIRS:
            if first in by_split and second in by_split:
                duplicates.setdefault(f"{first}/{second}", _Finding()).add(
                    len(by_split[second]), _same(by_split[second][0], by_split[first][0], first, second))
        labels = {}
        for key, label, index in group:
            labels.setdefault(label, name(key, index))
        if len(labels) > 1:
            (a, name_a), (b, name_b) = sorted(labels.items())[:2]
            names = info.class_names
            conflicts.add(1, f"{name_a} as {names[a]} and {names[b]}" if name_a == name_b else
                          f"{name_a} ({names[a]}) and {name_b} ({names[b]}) have the same bytes")
    train_labels = items["train"][1]
    report = {
        "images": {key: len(digests) for key, (digests, _, _) in items.items()},
        "allow_leaks": bool(allow_leaks),
        "leaks": duplicates.pop("train/test", _Finding()).to_dict(),
        "duplicates": {key: finding.to_dict() for key, finding in sorted(duplicates.items())},
        "label_conflicts": conflicts.to_dict(),
        "classes": _classes(np.bincount(train_labels, minlength=len(info.class_names)) if len(train_labels) else
                            np.zeros(len(info.class_names), np.int64), info),
    }
    report["seconds"] = round(time.perf_counter() - started, 3)
    leaks = report["leaks"]
    if leaks["count"] and not allow_leaks:
        n = leaks["count"]
        raise TfxferError(
            f"{n} test image{'s are' if n > 1 else ' is'} also in the training split (first: {leaks['examples'][0]}), "
            f"so the test accuracy would count images the model trained on; remove {'them' if n > 1 else 'it'} from "
            "one split, or pass --allow-leaks (allow_leaks: true in the config's data section) to go on anyway."
        )
    return report


def describe(report):
    """The report as the lines of one block: a summary, then one line per finding."""
    counts = ", ".join(f"{n:,} {key}" for key, n in report["images"].items())
    lines = findings(report)
    summary = f"{len(lines)} finding(s)" if lines else "no leak, duplicate, label conflict or class problem"
    head = f"preflight: {counts} images checked in {report['seconds']:.2f} s; {summary}"
    return [head] + ["  " + (line if line.startswith("leak") else "warning: " + line) for line in lines]


def findings(report):
    """One sentence per finding of the report, the leak (if allowed) first."""
    lines = []
    leaks = report["leaks"]
    if leaks["count"]:
        lines.append(f"leak (allowed by --allow-leaks): {_first(leaks, 'test image', 'also in train')}; the test "
                     "accuracy counts them")
    for key, finding in report["duplicates"].items():
        if "/" in key:
            first, second = key.split("/")
            lines.append(_first(finding, f"{second} image", f"also in {first}"))
        else:
            lines.append(_first(finding, "exact duplicate", f"within {key}"))
    if report["label_conflicts"]["count"]:
        lines.append(_first(report["label_conflicts"], "image", "under two labels"))
    classes = report["classes"]
    if classes["empty"]:
        lines.append(f"{len(classes['empty'])} class(es) with no training image: {', '.join(classes['empty'])}")
    if classes["tiny"]:
        listed = ", ".join(f"{name} {n}" for name, n in list(classes["tiny"].items())[:EXAMPLES])
        lines.append(f"{len(classes['tiny'])} class(es) with under {classes['tiny_below']} training images "
                     f"({listed}{', ...' if len(classes['tiny']) > EXAMPLES else ''})")
    imbalance = classes["imbalance"]
    if imbalance and imbalance["ratio"] > IMBALANCE_RATIO:
        (big, n_big), (small, n_small) = imbalance["largest"], imbalance["smallest"]
        lines.append(f"imbalanced classes: {big} has {n_big:,} training images, {small} {n_small:,} "
                     f"({imbalance['ratio']:.1f}x, above {IMBALANCE_RATIO:g}x); --class-weight balanced evens their loss")
    near = report.get("near_duplicates")
    if near and near["count"]:
        lines.append(f"{_first(near, 'test image', 'near a training image in feature space')} "
                     f"(cosine above {near['threshold']})")
    return lines


def near_duplicates(train_features, test_features, threshold=NEAR_DUPLICATE_COSINE, name=None, chunk=1024):
    """`{"count", "threshold", "examples"}`: the test images whose most similar
    training image is above `threshold` in cosine similarity of the features,
    centred on the training mean (pooled activations share a large positive
    component, which alone makes unrelated images look alike). Examples are
    `name(i)` (default `test #i`) and the similarity, most similar first."""
    train_features = np.asarray(train_features, np.float32)
    mean = train_features.mean(axis=0)
    train = _unit(train_features - mean)
    best = [(_unit(np.asarray(test_features[start:start + chunk], np.float32) - mean) @ train.T).max(axis=1)
            for start in range(0, len(test_features), chunk)]
    best = np.concatenate(best) if best else np.zeros(0, np.float32)
    found = np.flatnonzero(best > threshold)
    found = found[np.argsort(-best[found], kind="stable")]
    name = name or (lambda i: f"test #{i}")
    return {"count": int(len(found)), "threshold": threshold,
            "examples": [f"{name(i)} (cosine {best[i]:.3f})" for i in found[:EXAMPLES]]}


def check_cached_features(model, train_features, test, setting, info, log=print):
    """With a `--feature-cache` folder, add to `info.preflight` the test images
    near a training image in feature space, and log the finding. The test
    split's features come from the folder (computed and kept there the first
    time), as the training features do; with no folder or no test split,
    nothing is done."""

    report = info.preflight if info is not None else None
    if test is None or report is None or setting in FEATURE_CACHE:
        return
    test_features, _ = cached_features(model, test, setting, "test", log)
    files = info.files.get("test")
    root = _common_root([f for split in info.files.values() for f in split]) if files else None
    report["near_duplicates"] = near_duplicates(train_features, test_features,
                                                name=(lambda i: _display(files[i], root)) if files else None)
    if report["near_duplicates"]["count"]:
        log(f"preflight: {_first(report['near_duplicates'], 'test image', 'near a training image in feature space')} "
            f"(cosine above {NEAR_DUPLICATE_COSINE}; a warning)")


class _Finding:
    """A count and its first examples."""

    def __init__(self):
        self.count, self.examples = 0, []

    def add(self, count, example):
        self.count += count
        if len(self.examples) < EXAMPLES:
            self.examples.append(example)

    def to_dict(self):
        return {"count": self.count, "examples": self.examples}


def _digests(split, seen):
    """`(digests, labels, paths or None)` of a split's images in order; `seen`
    holds the digests of the files read so far, and gains this split's."""
    if split.from_paths:
        for path in split.items:
            if path not in seen:
                with open(path, "rb", buffering=0) as f:  # one unbuffered read: 20% faster on small files
                    seen[path] = hashlib.blake2b(f.read(), digest_size=16).digest()
        return [seen[p] for p in split.items], np.asarray(split.labels), split.items
    if split.items is not None:
        pairs = zip(split.items, split.labels)
    else:
        pairs = split.examples().as_numpy_iterator()
    digests, labels = [], []
    for image, label in pairs:
        image = np.ascontiguousarray(image)
        digests.append(hashlib.blake2b(str(image.shape).encode() + image.tobytes(), digest_size=16).digest())
        labels.append(label)
    return digests, np.asarray(labels, np.int64), None


def _namer(items):
    """`name(split, index)`: a file relative to the folder that holds all of them, else `"<split> #<index>"`."""
    root = []

    def name(key, index):
        paths = items[key][2]
        if paths is None:
            return f"{key} #{index}"
        if not root:  # only where there is something to report
            root.append(_common_root([p for _, _, ps in items.values() if ps is not None for p in ps]))
        return _display(paths[index], root[0])

    return name


def _common_root(paths):
    if not paths:
        return None
    return os.path.commonpath([os.path.dirname(os.fsencode(p)) for p in paths])


def _display(path, root):
    return os.fsdecode(os.path.relpath(os.fsencode(path), root) if root else path)


def _same(name, other, first=None, second=None):
    if name == other:
        return f"{name}, listed in {first} and {second}" if first else f"{name}, listed twice"
    return f"{name} has the same bytes as {other}"


def _first(finding, noun, what):
    n = finding["count"]
    return f"{n:,} {noun}{'s' if n > 1 else ''} {what} (first: {'; '.join(finding['examples'])})"


def _classes(counts, info):
    """Empty, tiny and imbalanced training classes. Where `labels_per_class`
    asked for fewer than `TINY_CLASS` images, only classes below it are tiny."""
    names = info.class_names
    tiny_below = min(TINY_CLASS, info.labels_per_class or TINY_CLASS)
    present = np.flatnonzero(counts)
    imbalance = None
    if len(present) > 1:
        big, small = present[np.argmax(counts[present])], present[np.argmin(counts[present])]
        imbalance = {"ratio": round(float(counts[big] / counts[small]), 2), "largest": [names[big], int(counts[big])],
                     "smallest": [names[small], int(counts[small])]}
    return {
        "per_class": {name: int(n) for name, n in zip(names, counts)},
        "empty": [names[c] for c in np.flatnonzero(counts == 0)],
        "tiny": {names[c]: int(counts[c]) for c in present if counts[c] < tiny_below},
        "tiny_below": tiny_below,
        "imbalance": imbalance,
    }


def _unit(features):
    features = np.asarray(features, np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
