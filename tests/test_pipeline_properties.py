"""Property-based: whatever images a folder holds (size, channels, bit depth,
format), training and evaluation batches come out `[B, S, S, 3]` uint8."""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tfxfer

images = st.tuples(
    st.integers(1, 80),  # height
    st.integers(1, 80),  # width
    st.sampled_from([1, 2, 3, 4]),  # grey, grey+alpha, RGB, RGBA
    st.sampled_from(["png8", "png16", "jpeg"]),
)


def _encode(rng, height, width, channels, kind):
    if kind == "jpeg":
        channels = 1 if channels in (1, 2) else 3  # JPEG holds grey or RGB
        pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        return tf.io.encode_jpeg(pixels).numpy()
    dtype = np.uint16 if kind == "png16" else np.uint8
    pixels = rng.integers(0, np.iinfo(dtype).max + 1, (height, width, channels), dtype=dtype)
    return tf.io.encode_png(pixels).numpy()


@pytest.mark.slow
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shapes=st.lists(images, min_size=2, max_size=7),
    size=st.integers(8, 48),
    batch_size=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_any_folder_of_images_gives_uint8_rgb_batches_of_the_asked_size(tmp_path_factory, shapes, size, batch_size, seed):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(seed)
    for i, shape in enumerate(shapes):
        folder = root / ("a" if i % 2 == 0 else "b")
        folder.mkdir(exist_ok=True)
        extension = "jpg" if shape[3] == "jpeg" else "png"
        (folder / f"{i}.{extension}").write_bytes(_encode(rng, *shape))
    train, val, _, info = tfxfer.load_dataset(
        data_dir=str(root), image_size=size, batch_size=batch_size, val_fraction=0.5, seed=seed, augment="flip_crop"
    )
    assert sum(info.num_examples.values()) == len(shapes) and not info.skipped_files
    for dataset in (train, val):
        for batch, labels in dataset.as_numpy_iterator():
            assert batch.dtype == np.uint8 and batch.shape[1:] == (size, size, 3)
            assert 1 <= batch.shape[0] <= batch_size and labels.shape == (batch.shape[0],)
