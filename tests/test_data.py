"""Calibration data sources and their errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sn_deploy.data import ArraySource, Preprocess, batches, load_recipe, open_source
from sn_deploy.errors import InputError


def test_npz_with_key(tmp_path):
    np.savez(tmp_path / "d.npz", a=np.zeros((4, 1, 2, 2)), b=np.ones((6, 3, 2, 2)))
    assert len(open_source(str(tmp_path / "d.npz"))) == 4
    src = open_source(f"{tmp_path / 'd.npz'}:b")
    assert len(src) == 6 and src.sample_shape() == (3, 2, 2)
    with pytest.raises(InputError, match="has no array 'c'"):
        open_source(f"{tmp_path / 'd.npz'}:c")


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        (tmp_path / f"c{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(
            tmp_path / f"c{i % 2}" / f"{i}.png")
    src = open_source(str(tmp_path), preprocess=Preprocess(resize=32, crop=24))
    assert len(src) == 3
    (batch,) = list(batches(src, 3, 1))
    assert batch.shape == (3, 3, 24, 24) and batch.dtype.is_floating_point
    assert abs(float(batch.mean())) < 2.5  # normalized


@pytest.mark.parametrize("make,match", [
    (lambda p: None, "not found"),
    (lambda p: p.write_text("nope"), "not a NumPy file"),
    (lambda p: np.save(p, np.zeros(5)), "expected a numeric array"),
])
def test_array_errors(make, match, tmp_path):
    path = tmp_path / "d.npy"
    make(path)
    with pytest.raises(InputError, match=match):
        ArraySource(str(path))


def test_empty_folder(tmp_path):
    with pytest.raises(InputError, match="no images"):
        open_source(str(tmp_path))


def test_broken_image(tmp_path):
    (tmp_path / "x.png").write_bytes(b"not a png")
    src = open_source(str(tmp_path), preprocess=Preprocess(resize=8, crop=8))
    with pytest.raises(InputError, match="cannot read image"):
        next(batches(src, 2, 1)) if len(src) >= 2 else src.get(np.array([0]))


def test_not_enough_samples(tmp_path):
    np.save(tmp_path / "d.npy", np.zeros((10, 1, 4, 4), np.float32))
    src = ArraySource(str(tmp_path / "d.npy"))
    with pytest.raises(InputError, match=r"needs 4 x 3 = 12 samples but the data has 10"):
        next(batches(src, 4, 3))
    with pytest.raises(InputError, match="at least 2"):
        next(batches(src, 1, 3))
    with pytest.raises(InputError, match="unknown --order"):
        next(batches(src, 2, 2, order="shuffled"))


def test_recipes_load():
    r = load_recipe("calibration/digits.yaml")
    assert (r.batch_size, r.num_batches, r.preprocess.channels) == (32, 40, 1)
    assert load_recipe("calibration/imagenet.yaml").num_batches == 200


def test_bad_recipe(tmp_path):
    (tmp_path / "r.yaml").write_text("batch_size: 4\npreprocess: {size: 3}\n")
    with pytest.raises(InputError, match="recipe"):
        load_recipe(str(tmp_path / "r.yaml"))


def test_grayscale_folder_with_digits_recipe(tmp_path):
    """The digits recipe: 8x8 grayscale, pixels scaled to [0, 1] then (x - 0.3) / 0.4."""
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "white.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "black.png")  # RGB → L
    src = open_source(str(tmp_path), recipe="calibration/digits.yaml")
    (batch,) = list(batches(src, 2, 1))
    assert batch.shape == (2, 1, 8, 8) and batch.dtype.is_floating_point
    np.testing.assert_allclose(batch[0].numpy(), (0 - 0.3) / 0.4, rtol=1e-6)  # black.png first
    np.testing.assert_allclose(batch[1].numpy(), (1 - 0.3) / 0.4, rtol=1e-6)


def test_resize_shorter_side_then_center_crop(tmp_path):
    img = np.zeros((20, 40), np.uint8)
    img[:, 15:25] = 255  # a bright vertical band in the middle
    Image.fromarray(img).save(tmp_path / "a.png")
    src = open_source(str(tmp_path), preprocess=Preprocess(resize=10, crop=10, mean=[0], std=[1],
                                                           channels=1))
    out = src.get(np.array([0]))[0, 0]  # 20x40 → 10x20 → centre 10x10: the band is cols 2..7
    assert out.shape == (10, 10)
    assert out[:, 3:7].min() > 0.9 and out[:, :1].max() < 0.1 and out[:, -1:].max() < 0.1


@pytest.mark.parametrize("kw,match", [
    ({"channels": 2}, "channels must be 1"),
    ({"channels": 1}, "3 values for 1 channel"),
    ({"std": (1, 0, 1)}, "positive"),
    ({"resize": 8, "crop": 16}, "crop <= resize"),
])
def test_preprocess_refuses_silent_broadcasts(kw, match):
    with pytest.raises(InputError, match=match):
        Preprocess(**kw)


@pytest.mark.parametrize("text,match", [
    ("batchsize: 4\n", "unknown field"),
    ("batch_size: many\n", "recipe"),
    ("- 1\n- 2\n", "mapping"),
    ("preprocess: {channels: 1}\n", "3 values for 1 channel"),
])
def test_recipe_errors(text, match, tmp_path):
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(InputError, match=match):
        load_recipe(str(tmp_path / "r.yaml"))


def test_non_finite_data_is_refused(tmp_path):
    arr = np.zeros((8, 1, 2, 2), np.float32)
    arr[5, 0, 1, 1] = np.nan
    np.save(tmp_path / "d.npy", arr)
    src = ArraySource(str(tmp_path / "d.npy"))
    assert len(list(batches(src, 2, 2))) == 2  # the NaN is in batch 2, not used
    with pytest.raises(InputError, match="batch 2 holds NaN"):
        list(batches(src, 2, 3))


def test_npz_first_array_and_sequential_batches(tmp_path):
    arr = np.arange(12 * 2, dtype=np.float64).reshape(12, 2, 1, 1)
    np.savez(tmp_path / "d.npz", x=arr)
    got = list(batches(open_source(str(tmp_path / "d.npz")), 4, 3, order="sequential"))
    assert all(b.dtype == torch.float32 and b.shape == (4, 2, 1, 1) for b in got)
    np.testing.assert_array_equal(np.concatenate([b.numpy() for b in got]), arr)
