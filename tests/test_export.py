import glob
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

import tfxfer
from tests.conftest import random_images

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
    np.savez(out, probabilities=by_array["probabilities"].numpy(), class_id=by_array["class_id"].numpy(),
             class_name=by_array["class_name"].numpy().astype(str), bytes_probabilities=by_bytes["probabilities"].numpy(),
             tfxfer_imported="tfxfer" in sys.modules)
    """
)


def _dir_bytes(path):
    return sum(os.path.getsize(f) for f in glob.glob(os.path.join(path, "**"), recursive=True) if os.path.isfile(f))


@pytest.mark.parametrize("backbone", ["mobilenetv2", "simplecnn", "resnet9"])
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

    # serve_bytes decodes and resizes 50 px -> 32 px exactly as the training pipeline does.
    from tfxfer.data.images import decode_image, resize_uint8

    pipeline_image = resize_uint8(decode_image(png.read_bytes()), 32).numpy()[None]
    np.testing.assert_allclose(served["bytes_probabilities"], model.predict(pipeline_image, verbose=0), atol=1e-5, rtol=0)

    # One model's weights, no L2-SP anchors: those would double the size.
    weight_bytes = sum(int(np.prod(w.shape)) * 4 for w in model.weights)
    assert len(model.penalty.anchors) > 0
    assert _dir_bytes(os.path.join(export_dir, "variables")) < 1.1 * weight_bytes
