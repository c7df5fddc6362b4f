import glob
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

import tfxfer
from tests.conftest import bfloat16, random_images

SERVE = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tensorflow as tf

    export_dir, inputs, png, out = sys.argv[1:]
    loaded = tf.saved_model.load(export_dir)
    images = tf.constant(np.load(inputs))
    by_array = loaded.signatures["serving_default"](images=images)
    by_bytes = loaded.signatures["serve_bytes"](image_bytes=tf.constant([open(png, "rb").read()]))
    empty_array = loaded.signatures["serving_default"](images=tf.zeros([0, 40, 40, 3], tf.uint8))
    empty_bytes = loaded.signatures["serve_bytes"](image_bytes=tf.constant([], tf.string))
    np.savez(out, probabilities=by_array["probabilities"].numpy(), class_id=by_array["class_id"].numpy(),
             class_name=by_array["class_name"].numpy().astype(str), bytes_probabilities=by_bytes["probabilities"].numpy(),
             empty_shapes=[empty_array["probabilities"].shape, empty_bytes["probabilities"].shape],
             empty_ids=[empty_array["class_id"].shape[0], empty_bytes["class_name"].shape[0]],
             tfxfer_imported="tfxfer" in sys.modules)
    """
)


def _dir_bytes(path):
    return sum(os.path.getsize(f) for f in glob.glob(os.path.join(path, "**"), recursive=True) if os.path.isfile(f))


@pytest.mark.parametrize("backbone", [pytest.param("mobilenetv2", marks=pytest.mark.slow), "simplecnn", "resnet9"])
def test_saved_model_serves_in_a_tensorflow_only_process(tmp_path, backbone):
    model = tfxfer.build_model(backbone, num_classes=4, weights=None, image_size=32, freeze="stages:2", l2sp=0.1)
    names = ["ant", "bee", "cat", "dog"]
    export_dir = tfxfer.export_saved_model(model, str(tmp_path / "export" / "1"), class_names=names)

    images = random_images(6)
    np.save(tmp_path / "in.npy", images)
    png = tmp_path / "one.png"
    Image.fromarray(random_images(1, size=50, seed=4)[0]).save(png)
    out = tmp_path / "out.npz"
    result = subprocess.run(
        [sys.executable, "-c", SERVE, export_dir, str(tmp_path / "in.npy"), str(png), str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    served = np.load(out)
    assert not served["tfxfer_imported"]

    expected = model.predict(images, verbose=0)
    np.testing.assert_allclose(served["probabilities"], expected, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(served["class_id"], expected.argmax(1))
    assert list(served["class_name"]) == [names[i] for i in expected.argmax(1)]
    # A batch of 0 gets an empty answer from both signatures, not a failed kernel.
    assert served["empty_shapes"].tolist() == [[0, 4], [0, 4]] and served["empty_ids"].tolist() == [0, 0]

    # serve_bytes decodes and resizes 50 px -> 32 px exactly as the training pipeline does.
    from tfxfer.data.images import decode_image, resize_uint8

    pipeline_image = resize_uint8(decode_image(png.read_bytes()), 32).numpy()[None]
    np.testing.assert_allclose(served["bytes_probabilities"], model.predict(pipeline_image, verbose=0), atol=1e-5, rtol=0)

    # One model's weights, no L2-SP anchors: those would double the size.
    weight_bytes = sum(int(np.prod(w.shape)) * 4 for w in model.weights)
    assert len(model.penalty.anchors) > 0
    assert _dir_bytes(os.path.join(export_dir, "variables")) < 1.1 * weight_bytes


@pytest.fixture(scope="module")
def run_dir(finished_run, tmp_path_factory):
    """The shared finished run, copied: these tests export into it."""
    import shutil

    copy = tmp_path_factory.mktemp("export") / "runs" / "r"
    shutil.copytree(finished_run, copy)
    return copy


def test_onnx_and_litert_match_the_saved_model_on_real_images(run_dir, shared_data):
    import json

    import onnxruntime
    from ai_edge_litert.interpreter import Interpreter

    from tests.conftest import run_cli, serve, split_images

    result = run_cli("export", run_dir, "--format", "onnx,litert")
    assert result.exit_code == 0, result.output
    assert "onnx: " in result.output and "litert: " in result.output

    # The client's side of the contract: resize as training did, then uint8 in.
    images, labels = split_images(shared_data, "test", 32)
    expected = serve(run_dir, images)
    assert (expected.argmax(axis=1) == labels).mean() >= 0.9  # a model that learned, so agreement means something
    np.testing.assert_allclose(serve(run_dir, images, "onnx"), expected, atol=1e-4, rtol=0)
    session = onnxruntime.InferenceSession(str(run_dir / "export" / "onnx" / "model.onnx"))
    assert session.get_modelmeta().custom_metadata_map["class_names"] == "cat,dog,owl"
    assert Interpreter(model_path=str(run_dir / "export" / "litert" / "model.tflite")).get_input_details()[0]["dtype"] == np.uint8
    np.testing.assert_allclose(serve(run_dir, images, "litert"), expected, atol=1e-4, rtol=0)

    for name in ("onnx", "litert"):
        metadata = json.loads((run_dir / "export" / name / "tfxfer.json").read_text())
        assert metadata["class_names"] == ["cat", "dog", "owl"] and metadata["max_abs_difference"] <= 1e-4
        card = (run_dir / "export" / name / "MODEL_CARD.md").read_text()
        assert f"This export: {name}, computing in float32." in card and "this format takes pixels" in card


def test_export_saved_model_again_and_bad_requests(run_dir, monkeypatch):
    import sys

    from tests.conftest import run_cli

    result = run_cli("export", run_dir)
    assert result.exit_code == 0 and (run_dir / "export" / "2" / "saved_model.pb").exists()
    unknown = run_cli("export", run_dir, "--format", "onxx")
    assert unknown.exit_code == 1 and "did you mean 'onnx'" in unknown.output
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as when the extra is not installed
    missing = run_cli("export", run_dir, "--format", "onnx", "--output", run_dir.parent / "elsewhere")
    assert missing.exit_code == 1 and "pip install 'tfxfer[onnx]'" in missing.output
    assert not (run_dir.parent / "elsewhere").exists()  # nothing half-written is left


@bfloat16
def test_a_bfloat16_run_exports_float32_in_every_format(tmp_path, shared_data):
    # bfloat16 is emulated where the CPU lacks it: slow, but the same graph.
    import json

    import tensorflow as tf

    from tests.conftest import run_cli, serve, split_images

    data = shared_data
    result = run_cli("finetune", "--data-dir", data, "--backbone", "simplecnn", "--weights", "none", "--image-size", "32",
                     "--epochs", "1", "--precision", "mixed_bfloat16", "--output-dir", tmp_path / "runs", "--run-name", "b")
    assert result.exit_code == 0, result.output
    assert "precision: mixed_bfloat16" in result.output
    # simplecnn has no normalisation layer at all: the note must not invent LayerNorms.
    assert "BatchNorm: none in simplecnn; it has no normalisation layer" in result.output and "LayerNorm" not in result.output
    run = tmp_path / "runs" / "b"
    graph = tf.saved_model.load(str(run / "export" / "1")).signatures["serving_default"].graph.as_graph_def()
    types = {node.attr["T"].type for f in graph.library.function for node in f.node_def if node.op in ("Conv2D", "MatMul")}
    assert types == {tf.float32.as_datatype_enum}
    assert json.loads((run / "export" / "1" / "tfxfer.json").read_text())["precision"] == "float32"
    result = run_cli("export", run, "--format", "onnx,litert")
    assert result.exit_code == 0, result.output
    images, _ = split_images(data, "test", 32)
    expected = serve(run, images)
    for name in ("onnx", "litert"):
        metadata = json.loads((run / "export" / name / "tfxfer.json").read_text())
        assert metadata["precision"] == "float32"
        np.testing.assert_allclose(serve(run, images, name), expected, atol=1e-4, rtol=0)
    result = run_cli("export", run, "--format", "saved_model", "--precision", "bfloat16")
    assert result.exit_code == 0, result.output
    assert "bfloat16" in result.output and "allowed: 0.03" in result.output


def test_calibrate_folds_the_temperature_into_every_export_and_evaluate_reports_tta(tmp_path):
    import json

    from tests.conftest import run_cli, write_splits

    write_splits(tmp_path / "data", train=12, test=4)
    result = run_cli(
        "finetune", "--data-dir", tmp_path / "data", "--backbone", "tiny", "--weights", "none", "--image-size", "32",
        "--epochs", "2", "--batch-size", "8", "--lr", "0.05", "--calibrate", "--top-k", "2",
        "--output-dir", tmp_path / "runs", "--run-name", "cal",
    )
    assert result.exit_code == 0, result.output
    assert "calibration: temperature" in result.output
    run = tmp_path / "runs" / "cal"
    metrics = json.loads((run / "metrics.json").read_text())
    temperature = metrics["calibration"]["temperature"]
    assert temperature != 1.0 and {"val_ece_before", "val_ece_after", "test_ece_before"} <= set(metrics["calibration"])
    # On the split it was fitted on, the temperature cannot do worse than T = 1.
    assert metrics["calibration"]["val_ece_after"] <= metrics["calibration"]["val_ece_before"] + 0.05
    assert metrics["test"]["top_k"]["k"] == 2 and "ece" in metrics["test"]["calibration"]
    assert (run / "reliability.png").stat().st_size > 0
    export = run / "export" / "1"
    card = (export / "MODEL_CARD.md").read_text()
    for fact in ("over 3 classes", "`tiny`, weights from `none` (random initialization)", "`cat`, `dog`, `owl`",
                 "Training images per class: cat ", "Unreadable files skipped: 0",
                 f"top-2 {metrics['test']['top_k']['accuracy']:.4f}", f"T = {temperature:.3f}",
                 "| owl | ", "It knows only its 3 classes", "EXIF"):
        assert fact in card, fact
    assert json.loads((export / "tfxfer.json").read_text())["temperature"] == temperature
    # The served probabilities are the uncalibrated ones at that temperature: the head was scaled, nothing else.
    from tfxfer.evaluation import apply_temperature

    npz = np.load(run / "test_predictions.npz")
    result = run_cli("evaluate", "--model", run, "--data-dir", tmp_path / "data", "--tta", "flip", "--output",
                     tmp_path / "eval")
    assert result.exit_code == 0, result.output
    assert "with test-time augmentation (flip, 2 views)" in result.output
    evaluation = json.loads((tmp_path / "eval" / "metrics.json").read_text())["evaluations"]
    report = next(iter(evaluation.values()))
    assert np.isclose(report["accuracy"], metrics["test"]["accuracy"])
    assert np.isclose(report["tta"]["gain"], report["tta"]["accuracy"] - report["accuracy"])
    assert (tmp_path / "eval" / "reliability-test.png").exists()
    import keras

    import tfxfer.model  # noqa: F401

    model = keras.models.load_model(run / "model.keras", compile=False)
    assert model.calibration_temperature == temperature
    kernel, bias = model.head.get_weights()
    model.head.set_weights([kernel * temperature, bias * temperature])
    raw = model.predict(np.zeros((1, 32, 32, 3), np.uint8), verbose=0)
    scaled = keras.models.load_model(run / "model.keras", compile=False).predict(np.zeros((1, 32, 32, 3), np.uint8), verbose=0)
    assert np.allclose(apply_temperature(raw, temperature), scaled, atol=1e-5)
    assert npz["probabilities"].shape[1] == 3


# Points of test accuracy an int8 export of the shared run may lose against its float model, scored
# here by the LiteRT interpreter itself (12 test images: one image is 8.3 points).
INT8_TOLERANCE = 0.09


def test_litert_int8_is_full_integer_with_uint8_in_and_probabilities_out(run_dir, shared_data, monkeypatch):
    import json

    from ai_edge_litert.interpreter import Interpreter

    from tests.conftest import run_cli, serve, split_images
    from tfxfer.export import registry

    result = run_cli("export", run_dir, "--format", "litert", "--quantize", "int8")
    assert result.exit_code == 0, result.output
    path = run_dir / "export" / "litert-int8" / "model.tflite"
    interpreter = Interpreter(model_path=str(path))
    assert interpreter.get_input_details()[0]["dtype"] == np.uint8
    assert interpreter.get_output_details()[0]["dtype"] == np.float32
    kinds = {d["dtype"] for d in interpreter.get_tensor_details()}
    assert np.int8 in kinds  # the kernels compute in int8, not float with int8 storage only
    if not (run_dir / "export" / "litert" / "model.tflite").exists():
        assert run_cli("export", run_dir, "--format", "litert").exit_code == 0
    float_size = (run_dir / "export" / "litert" / "model.tflite").stat().st_size
    assert path.stat().st_size < float_size / 2.5
    # Scored by the interpreter on the run's test images, against the float model, which learned the classes.
    images, labels = split_images(shared_data, "test", 32)
    float_accuracy = (serve(run_dir, images).argmax(axis=1) == labels).mean()
    int8_accuracy = (serve(run_dir, images, "litert-int8").argmax(axis=1) == labels).mean()
    assert float_accuracy >= 0.9 and int8_accuracy >= float_accuracy - INT8_TOLERANCE, (float_accuracy, int8_accuracy)
    metadata = json.loads((path.parent / "tfxfer.json").read_text())
    assert metadata["quantize"] == "int8" and metadata["images"] == len(labels)
    assert metadata["accuracy"] == pytest.approx(int8_accuracy) and metadata["float_accuracy"] == pytest.approx(float_accuracy)
    assert "test accuracy" in result.output and "against" in result.output and "for the float32 model" in result.output
    assert "int8-quantized" in (path.parent / "MODEL_CARD.md").read_text()

    # Any drop over the limit is a warning of the export itself.
    monkeypatch.setattr(registry, "MAX_QUANTIZED_DROP", -1.0)
    result = run_cli("export", run_dir, "--format", "litert", "--quantize", "dynamic")
    assert result.exit_code == 0 and "warning: dynamic quantization costs" in result.output
    bad = run_cli("export", run_dir, "--format", "onnx", "--quantize", "int8")
    assert bad.exit_code == 1 and "--quantize is for --format litert" in bad.output


@bfloat16
def test_serving_names_its_version_prefers_float32_and_exports_check_against_the_float32_model(run_copy, shared_data,
                                                                                                tmp_path):
    import json

    from tests.conftest import run_cli

    run = run_copy
    assert run_cli("export", run, "--precision", "bfloat16").exit_code == 0
    assert json.loads((run / "export" / "2" / "tfxfer.json").read_text())["precision"] == "bfloat16"
    image = str(sorted((shared_data / "test" / "owl").iterdir())[0])
    served = run_cli("predict", "--model", run, image)
    assert served.exit_code == 0, served.output
    assert served.output.splitlines()[:2] == [
        f"model: {run / 'export' / '1'} (version 1, float32; other versions: 2 bfloat16; choose with --version)", image]
    asked = run_cli("predict", "--model", run, "--version", "2", "--json", image)
    assert asked.exit_code == 0, asked.output
    assert asked.stderr.splitlines()[0] == (f"model: {run / 'export' / '2'} (version 2, bfloat16; other versions: "
                                            "1 float32; choose with --version)")
    assert [answer["file"] for answer in json.loads(asked.stdout)] == [image]
    evaluated = run_cli("evaluate", "--model", run, "--version", "2", "--data-dir", shared_data, "--output",
                        tmp_path / "eval")
    assert evaluated.exit_code == 0, evaluated.output
    assert evaluated.output.splitlines()[0].startswith(f"model: {run / 'export' / '2'} (version 2, bfloat16;")

    # The newest SavedModel computes in bfloat16; the ONNX export is still held to float32's 1e-4, against model.keras.
    exported = run_cli("export", run, "--format", "onnx")
    assert exported.exit_code == 0, exported.output
    assert "from the run's float32 model (model.keras)" in exported.output
    metadata = json.loads((run / "export" / "onnx" / "tfxfer.json").read_text())
    assert metadata["checked_against"] == "the run's float32 model (model.keras)" and metadata["max_abs_difference"] <= 1e-4


def test_int8_export_without_a_test_split_or_an_export_folder_names_its_split_and_keeps_quiet(tmp_path, capfd,
                                                                                               monkeypatch):
    import json
    import shutil

    from tests.conftest import run_cli, write_class_folder
    from tfxfer.errors import TfxferError
    from tfxfer.export import get_format

    write_class_folder(str(tmp_path / "data"), classes=("cat", "dog"), per_class=8)  # no test split
    trained = run_cli("finetune", "--data-dir", tmp_path / "data", "--backbone", "tiny", "--weights", "none",
                      "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--output-dir", tmp_path / "runs",
                      "--run-name", "v")
    assert trained.exit_code == 0, trained.output
    run = tmp_path / "runs" / "v"
    shutil.rmtree(run / "export")  # the user deleted it
    capfd.readouterr()
    result = run_cli("export", run, "--format", "litert", "--quantize", "int8")
    assert result.exit_code == 0, result.output
    assert "validation accuracy" in result.output and "the run has no test split" in result.output, result.output
    validation = json.loads((run / "metrics.json").read_text())["num_examples"]["val"]
    metadata = json.loads((run / "export" / "litert-int8" / "tfxfer.json").read_text())
    assert metadata["split"] == "val" and metadata["images"] == validation
    card = (run / "export" / "litert-int8" / "MODEL_CARD.md").read_text()
    assert f"on {validation} images of the validation split (the data has no test split)" in card
    # The converter's settings ("fully_quantize: 0, ...") and the interpreter's notes stay unprinted ...
    printed = capfd.readouterr()
    assert "fully_quantize" not in printed.out + printed.err and "XNNPACK" not in printed.out + printed.err

    # ... unless the conversion fails: then they come with the error.
    def failing(model, folder, class_names, **options):
        import os

        os.write(2, b"converter settings: inference_type 6\n")
        raise TfxferError("The converter failed.")

    monkeypatch.setattr(get_format("litert"), "write", failing)
    failed = run_cli("export", run, "--format", "litert", "--output", tmp_path / "failed")
    assert failed.exit_code == 1 and "The converter failed." in failed.output
    assert "converter settings: inference_type 6" in failed.output
    assert not (tmp_path / "failed").exists()
