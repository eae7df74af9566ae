"""Calibration data sources: read lazily, batched as asked, checked before anything runs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from onnxcomp.calibration.analysis import Calibration, CalibrationWarning
from onnxcomp.calibration.sources import CalibOptions, open_calibration
from onnxcomp.errors import ConfigError, InputMismatchError
from onnxcomp.feeds import input_specs
from onnxcomp.modelio import load_model

from conftest import MODELS

DIGITS = MODELS / "digits_cnn.onnx"


@pytest.fixture(scope="module")
def specs():
    return input_specs(load_model(DIGITS))


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 8, 8)).astype(np.float32)


def collected(dataset) -> tuple[np.ndarray, list[int]]:
    batches = [b["image"] for b in dataset.batches()]
    return np.concatenate(batches), [len(b) for b in batches]


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_is_streamed_in_batches_up_to_the_sample_cap(tmp_path, specs, compressed):
    data = images(50)
    path = tmp_path / "c.npz"
    (np.savez_compressed if compressed else np.savez)(path, image=data)
    dataset = open_calibration(path, specs, {}, CalibOptions(samples=45, batch=16))
    stacked, sizes = collected(dataset)
    assert sizes == [16, 16, 13]
    np.testing.assert_array_equal(stacked, data[:45])
    assert "45 of 50 samples" in dataset.label and dataset.samples == 45


def test_folder_of_single_sample_npy_and_npz_files(tmp_path, specs):
    data = images(7)
    for i in range(5):
        np.save(tmp_path / f"{i:02d}.npy", data[i, 0][None])  # one sample, no sample axis
    np.savez(tmp_path / "05.npz", image=data[5:7])
    stacked, sizes = collected(open_calibration(tmp_path, specs, {}, CalibOptions(batch=4)))
    assert sizes == [4, 3]
    np.testing.assert_array_equal(stacked, data)


def test_folder_of_images_is_resized_and_normalized(tmp_path, specs):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (3, 16, 16), dtype=np.uint8)
    for i, p in enumerate(pixels):
        Image.fromarray(p, mode="L").save(tmp_path / f"{i}.png")
    dataset = open_calibration(tmp_path, specs, {}, CalibOptions(mean=(0.5,), std=(0.25,)))
    stacked, sizes = collected(dataset)
    assert sizes == [3] and stacked.shape == (3, 1, 8, 8) and stacked.dtype == np.float32
    expected = np.asarray(Image.fromarray(pixels[0], mode="L").resize((8, 8), Image.BILINEAR), np.float32) / 255
    np.testing.assert_allclose(stacked[0, 0], (expected - 0.5) / 0.25, rtol=1e-6)


def test_one_shot_iterator_of_feeds_can_be_read_twice(specs):
    data = images(20)
    feeds = ({"image": data[i : i + 5]} for i in range(0, 20, 5))
    dataset = open_calibration(feeds, specs, {}, CalibOptions(samples=12, batch=8))
    first, sizes = collected(dataset)
    second, _ = collected(dataset)
    assert sizes == [8, 4]
    np.testing.assert_array_equal(first, data[:12])
    np.testing.assert_array_equal(second, first)


@pytest.mark.parametrize("content,message", [
    (dict(pixels=images(4)), r"missing \['image'\], unexpected \['pixels'\]"),
    (dict(image=images(4).astype(np.float64)), r"input 'image' is float64, the model expects float32"),
    (dict(image=np.zeros((4, 1, 8, 9), np.float32)), r"input 'image' has shape \[None, 1, 8, 9\], the model expects"),
    (dict(image=np.zeros((4, 8, 8), np.float32)), r"input 'image' has shape"),
])
def test_mismatching_npz_is_refused_before_running(tmp_path, specs, content, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **content)
    with pytest.raises(InputMismatchError, match=message):
        open_calibration(path, specs, {}, CalibOptions())


def test_bad_paths_and_options(tmp_path, specs):
    with pytest.raises(InputMismatchError, match="no such file or folder"):
        open_calibration(tmp_path / "missing.npz", specs, {}, CalibOptions())
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(InputMismatchError, match="holds no .npy, .npz or image files"):
        open_calibration(tmp_path, specs, {}, CalibOptions())
    with pytest.raises(InputMismatchError, match="not an .npz file"):
        open_calibration(tmp_path / "notes.md", specs, {}, CalibOptions())
    (tmp_path / "lines.txt").write_text("some text")
    with pytest.raises(ConfigError, match="needs the model's tokenizer"):
        open_calibration(tmp_path / "lines.txt", specs, {}, CalibOptions())
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(InputMismatchError, match="not a readable .npz"):
        open_calibration(tmp_path / "broken.npz", specs, {}, CalibOptions())
    with pytest.raises(ConfigError, match="--calib-samples 0"):
        CalibOptions(samples=0)
    with pytest.raises(ConfigError, match="--layout"):
        CalibOptions(layout="CHW")


def test_images_need_a_single_image_input(tmp_path, minilm):
    Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(tmp_path / "a.png")
    with pytest.raises(InputMismatchError, match="a folder of images feeds one image input"):
        open_calibration(tmp_path, input_specs(load_model(minilm)), {}, CalibOptions())


def test_synthetic_data_warns_and_none_refuses():
    model = load_model(DIGITS)
    with pytest.warns(CalibrationWarning, match="synthetic calibration inputs"):
        assert Calibration().dataset(model, "test").synthetic
    with pytest.raises(ConfigError, match="--calib none forbids synthetic inputs"):
        Calibration("none").dataset(model, "test")
