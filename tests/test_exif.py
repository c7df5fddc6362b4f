"""Photos as people have them: a JPEG's EXIF orientation is applied where images are read."""

import io
import struct

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from tfxfer.data.images import decode_image, exif_orientation

# A 24 x 40 picture whose four corners differ, so every turn and mirror shows.
PIXELS = np.zeros((24, 40, 3), np.uint8)
PIXELS[:12, :20] = (250, 10, 10)
PIXELS[:12, 20:] = (10, 250, 10)
PIXELS[12:, :20] = (10, 10, 250)
PIXELS[12:, 20:] = (250, 250, 10)


def _jpeg(orientation, exif=None):
    buffer = io.BytesIO()
    if exif is None:
        tags = Image.Exif()
        tags[0x010F] = "tfxfer test camera"  # another tag first, so the search has to walk the directory
        tags[0x0112] = orientation
        exif = tags.tobytes()
    Image.fromarray(PIXELS).save(buffer, "JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def _big_endian_exif(orientation):
    """An EXIF block in Motorola byte order ("MM"), which PIL does not write itself."""
    entry = struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)
    return b"Exif\x00\x00" + b"MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", 1) + entry + b"\x00\x00\x00\x00"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_decodes_upright_as_pil_turns_it(orientation):
    data = _jpeg(orientation)
    assert int(exif_orientation(tf.constant(data))) == orientation
    # The same JPEG pixels, turned by PIL's reading of the tag: exact, whatever the JPEG decoder's rounding.
    stored = Image.fromarray(decode_image(tf.constant(_jpeg(1))).numpy())
    stored.getexif()[0x0112] = orientation
    expected = np.asarray(ImageOps.exif_transpose(stored))
    np.testing.assert_array_equal(decode_image(tf.constant(data)).numpy(), expected)


def test_big_endian_exif_and_images_without_one():
    data = _jpeg(6, exif=_big_endian_exif(6))
    assert int(exif_orientation(tf.constant(data))) == 6
    assert decode_image(tf.constant(data)).shape == (40, 24, 3)
    png = io.BytesIO()
    Image.fromarray(PIXELS).save(png, "PNG")
    for plain in (png.getvalue(), _jpeg(1, exif=b""), b"\xff\xd8 truncated Exif\x00\x00MM"):
        assert int(exif_orientation(tf.constant(plain))) == 1


def test_the_saved_model_turns_served_photos_upright(tmp_path):
    import tfxfer

    model = tfxfer.build_model("simplecnn", num_classes=2, weights=None, image_size=32)
    export = tfxfer.export_saved_model(model, str(tmp_path / "export" / "1"), class_names=["a", "b"])
    serve = tf.saved_model.load(export).signatures["serve_bytes"]
    # The served JPEG with the tag, against the same pixels turned by hand and sent as PNG.
    upright = np.rot90(decode_image(tf.constant(_jpeg(1))).numpy(), 3)
    buffer = io.BytesIO()
    Image.fromarray(upright).save(buffer, "PNG")
    by_tag = serve(image_bytes=tf.constant([_jpeg(6)]))["probabilities"].numpy()
    by_pixels = serve(image_bytes=tf.constant([buffer.getvalue()]))["probabilities"].numpy()
    np.testing.assert_allclose(by_tag, by_pixels, atol=1e-6)


def test_decoding_holds_no_transpose_that_onednn_would_refuse():
    # A uint8 Transpose in a graph makes oneDNN log "supports DT_UINT8 only ..." at
    # error level in every process that decodes images; a float32 one gets moved onto
    # the uint8 tensor by Grappler. Orientations 5-8 transpose by a gather instead.
    decode = tf.function(decode_image).get_concrete_function(tf.TensorSpec([], tf.string))
    graphs = [decode.graph.as_graph_def()]
    ops = [node.op for graph in graphs for node in graph.node]
    ops += [node.op for function in graphs[0].library.function for node in function.node_def]
    assert "SwitchCase" in ops or "StatelessCase" in ops or "Case" in ops  # the orientations are in the graph
    assert "Transpose" not in ops
