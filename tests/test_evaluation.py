import numpy as np
from sklearn.metrics import confusion_matrix, log_loss, precision_recall_fscore_support

from tfxfer.evaluation import classification_report, format_report


def test_report_matches_scikit_learn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    labels[:3] = 3
    probabilities = rng.dirichlet(np.ones(4), 200)
    probabilities[:, 2] *= 0.01  # class 2 is never predicted: precision 0 by convention
    probabilities /= probabilities.sum(1, keepdims=True)
    report = classification_report(labels, probabilities, ["a", "b", "c", "d"])

    predicted = probabilities.argmax(1)
    p, r, f, s = precision_recall_fscore_support(labels, predicted, labels=range(4), zero_division=0)
    assert np.allclose([report["per_class"][n]["precision"] for n in "abcd"], p)
    assert np.allclose([report["per_class"][n]["recall"] for n in "abcd"], r)
    assert np.allclose([report["per_class"][n]["f1"] for n in "abcd"], f)
    assert [report["per_class"][n]["support"] for n in "abcd"] == list(s)
    assert np.isclose(report["macro"]["f1"], f.mean())
    assert report["confusion_matrix"] == confusion_matrix(labels, predicted, labels=range(4)).tolist()
    assert np.isclose(report["loss"], log_loss(labels, probabilities, labels=range(4)))
    assert np.isclose(report["accuracy"], (predicted == labels).mean())
    text = format_report(report)
    assert "macro avg" in text and "confusion matrix" in text


def test_loss_is_not_capped_at_keras_probability_epsilon():
    probabilities = np.array([[1e-9, 1 - 1e-9], [0.5, 0.5]])
    report = classification_report(np.array([0, 0]), probabilities, ["a", "b"])
    assert np.isclose(report["loss"], (-np.log(1e-9) - np.log(0.5)) / 2)


def test_class_names_with_spaces_and_accents_show_in_full(tmp_path):
    import warnings

    from PIL import Image

    from tfxfer.reporting import plots

    names = ["grüne Äpfel", "red apples", "Crème brûlée", "Ωmega"]
    labels = np.array([0, 1, 2, 3, 0, 1])
    probabilities = np.eye(4)[[0, 1, 2, 3, 1, 1]] * 0.9 + 0.025
    report = classification_report(labels, probabilities, names)
    text = format_report(report)
    header = next(line for line in text.splitlines() if "red apples" in line and "Crème brûlée" in line)
    assert all(name in header for name in names)  # the matrix's column heads, untruncated
    assert all(any(line.startswith(name + " ") for line in text.splitlines()) for name in names)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plots.confusion_matrix(report["confusion_matrix"], names, str(tmp_path / "cm.png"), "Äpfel: test")
    assert not [w for w in caught if "missing from" in str(w.message)]  # every glyph drawn
    with Image.open(tmp_path / "cm.png") as image:
        assert image.size[0] >= 300


def test_top_k_matches_scikit_learn():
    from sklearn.metrics import top_k_accuracy_score

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 6, 300)
    probabilities = rng.dirichlet(np.ones(6), 300)
    report = classification_report(labels, probabilities, list("abcdef"), top_k=3)
    assert report["top_k"]["k"] == 3
    assert np.isclose(report["top_k"]["accuracy"], top_k_accuracy_score(labels, probabilities, k=3, labels=range(6)))
    assert "top-3 accuracy" in format_report(report)
    # With as many classes as K, every image is within the top K: nothing to report.
    assert "top_k" not in classification_report(labels[:10] % 2, probabilities[:10, :2] / probabilities[:10, :2].sum(1, keepdims=True), ["a", "b"], top_k=2)


def test_expected_calibration_error_of_known_cases():
    from tfxfer.evaluation import calibration

    # Ten images at confidence 0.9: nine right is calibrated, ten right is 0.1 under-confident.
    probabilities = np.tile([0.9, 0.1], (10, 1))
    assert np.isclose(calibration(np.array([0] * 9 + [1]), probabilities)["ece"], 0.0)
    assert np.isclose(calibration(np.zeros(10, int), probabilities)["ece"], 0.1)
    # Two bins: 0.6 with half right (|0.5 - 0.6|) and 0.95 all right (|1 - 0.95|), weighted 4:4.
    probabilities = np.array([[0.6, 0.4]] * 4 + [[0.95, 0.05]] * 4)
    labels = np.array([0, 0, 1, 1, 0, 0, 0, 0])
    result = calibration(labels, probabilities)
    assert np.isclose(result["ece"], 0.5 * 0.1 + 0.5 * 0.05)
    assert sum(b["count"] for b in result["bins"]) == 8 and len(result["bins"]) == 15


def test_temperature_scaling_recovers_the_overconfidence_it_undoes():
    from tfxfer.evaluation import apply_temperature, calibration, fit_temperature

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, (4000, 5))
    truth = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(5, p=p) for p in truth])
    overconfident = apply_temperature(truth, 1 / 3)  # logits times 3
    temperature = fit_temperature(labels, overconfident)
    assert 2.7 < temperature < 3.3
    calibrated = apply_temperature(overconfident, temperature)
    assert calibration(labels, calibrated)["ece"] < calibration(labels, overconfident)["ece"] / 3
    assert (calibrated.argmax(1) == overconfident.argmax(1)).all()


def test_tta_views_are_the_mirror_images_and_shifted_crops():
    import tensorflow as tf

    from tfxfer.inference import tta_views

    images = tf.constant(np.arange(2 * 16 * 16 * 3, dtype=np.int64).reshape(2, 16, 16, 3) % 251, tf.uint8)
    flip = tta_views(images, "flip")
    assert len(flip) == 2 and np.array_equal(flip[1].numpy(), images.numpy()[:, :, ::-1])
    crops = tta_views(images, "flip_crop")
    assert len(crops) == 10 and all(v.shape == images.shape for v in crops)
    # The bottom-right crop is the image moved up and left by S/8 = 2 pixels.
    assert np.array_equal(crops[4].numpy()[:, :14, :14], images.numpy()[:, 2:, 2:])
