"""Settings validation and the data loaders."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nbmodule import notebook_parameters


def resolve(nb, env, cuda=False):
    return nb.resolve_settings(notebook_parameters(), env, cuda_available=cuda)


def test_profile_auto_follows_cuda(nb):
    assert resolve(nb, {}, cuda=False).profile == "quick"
    full = resolve(nb, {}, cuda=True)
    assert (full.profile, full.device, full.fid_samples, full.batch_size) == ("full", "cuda", 50000, 128)


def test_environment_overrides_parameters(nb):
    s = resolve(nb, {"PROFILE": "smoke", "EPOCHS": "3", "MODELS": "dcgan, conv_vae", "SEED": "7", "BETA": "4"})
    assert (s.profile, s.dataset, s.epochs, s.models, s.seed, s.beta) == ("smoke", "synthetic", 3,
                                                                         ("dcgan", "conv_vae"), 7, 4.0)


@pytest.mark.parametrize("env, setting", [
    ({"PROFILE": "fast"}, "PROFILE"),
    ({"EPOCHS": "-1"}, "EPOCHS"),
    ({"EPOCHS": "two"}, "EPOCHS"),
    ({"DATASET": "imagenet"}, "DATASET"),
    ({"DATASET": "folder"}, "DATASET"),
    ({"DATASET": "folder", "DATA_DIR": "/no/such/folder"}, "DATA_DIR"),
    ({"DEVICE": "cuda"}, "DEVICE"),
    ({"GAN_EMA": "1.5"}, "GAN_EMA"),
    ({"FID_SAMPLES": "1"}, "FID_SAMPLES"),
])
def test_bad_settings_name_the_setting(nb, env, setting):
    with pytest.raises(nb.SettingsError) as err:
        resolve(nb, env)
    assert str(err.value).startswith(setting)
    assert ":" in str(err.value) and "\n" not in str(err.value)  # one line: what is wrong, then the fix


def test_all_errors_reported_at_once(nb):
    with pytest.raises(nb.SettingsError) as err:
        resolve(nb, {"PROFILE": "x", "EPOCHS": "0", "BATCH_SIZE": "z"})
    assert len(str(err.value).splitlines()) == 3


def test_folder_without_images_is_rejected(nb, tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "notes.txt").write_text("no images here")
    with pytest.raises(nb.SettingsError, match="DATA_DIR.*holds no images"):
        resolve(nb, {"DATASET": "folder", "DATA_DIR": str(tmp_path)})


def test_unknown_model_name(nb, settings):
    with pytest.raises(nb.SettingsError, match="MODELS has unknown name"):
        nb.selected_models(settings(MODELS="dcgan,stylegan9"))
    assert nb.selected_models(settings(MODELS="all")) == list(nb.MODEL_REGISTRY)
    assert "mlp_gan" in nb.selected_models(settings(DATASET="mnist"))
    assert "mlp_gan" not in nb.selected_models(settings())


def test_check_settings_cli_exits_2_with_one_line(tmp_path):
    import os
    env = {**os.environ, "PROFILE": "nope"}
    out = subprocess.run([sys.executable, str(Path(__file__).parent / "nbmodule.py"), "--check-settings"],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["settings error: PROFILE='nope' is unknown: use one of auto, smoke, quick, full"]


def test_synthetic_images_are_deterministic_and_structured(nb):
    x1, y1 = nb.synthetic_images(50, 3)
    x2, y2 = nb.synthetic_images(50, 3)
    assert x1.dtype == np.uint8 and x1.shape == (50, 3, 32, 32)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert set(np.unique(y1)) <= set(range(10))
    # structure, not white noise: neighbouring pixels are strongly correlated
    a, b = x1[:, :, :, :-1].astype(float).ravel(), x1[:, :, :, 1:].astype(float).ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.8


def _write_images(folder, n, size):
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_folder_with_train_and_test_splits(nb, settings, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the decode cache goes to ./.cache
    root = tmp_path / "imgs"
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("a", "b"):
            _write_images(root / split / cls, n, (40, 50))
    data = nb.load_dataset(settings(DATASET="folder", DATA_DIR=root, N_TRAIN=100))
    assert data.train_x.shape == (6, 3, 32, 32) and data.test_x.shape == (4, 3, 32, 32)
    assert data.train_x.dtype == torch.uint8 and sorted(data.train_y.tolist()) == [0, 0, 0, 1, 1, 1]
    again = nb.load_dataset(settings(DATASET="folder", DATA_DIR=root, N_TRAIN=100))  # from the cache
    assert torch.equal(torch.sort(again.train_x.flatten(1).sum(1))[0], torch.sort(data.train_x.flatten(1).sum(1))[0])


def test_flat_class_folder_is_split(nb, settings, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for cls in ("x", "y"):
        _write_images(tmp_path / "imgs" / cls, 10, (32, 32))
    data = nb.load_dataset(settings(DATASET="folder", DATA_DIR=tmp_path / "imgs", N_TRAIN=100))
    assert len(data.train_x) == 18 and len(data.test_x) == 2


def _write_idx(path, array):
    import struct
    header = struct.pack(">HBB", 0, 8, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_is_padded_to_32(nb, settings, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 12), ("t10k", 5)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", np.full((n, 28, 28), 200))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    data = nb.load_dataset(settings(DATASET="mnist", DATA_DIR=tmp_path, N_TRAIN=100))
    assert data.train_x.shape == (12, 1, 32, 32) and data.test_x.shape == (5, 1, 32, 32)
    assert data.train_x[0, 0, 0, 0] == 0 and data.train_x[0, 0, 2, 2] == 200  # zero border, image inside


def test_missing_cifar_offline_says_where_to_put_it(nb, settings, monkeypatch):
    import torchvision

    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(nb.SettingsError, match="DATASET=cifar10.*cifar-10-batches-py"):
        nb.load_dataset(settings(DATASET="cifar10"))


def test_batches_cover_every_index_once_and_repeat_per_epoch(nb):
    data = torch.arange(10)
    batches = list(nb.Batches(data, 3, seed=1, epoch=0, drop_last=False))
    assert sorted(torch.cat(batches).tolist()) == list(range(10)) and len(batches) == 4
    assert [b.tolist() for b in nb.Batches(data, 3, 1, 0)] == [b.tolist() for b in batches[:3]]
    assert torch.cat(list(nb.Batches(data, 3, 1, 1))).tolist() != torch.cat(batches[:3]).tolist()
    x, y = next(iter(nb.Batches((data, data * 2), 4, 0, 0)))
    assert torch.equal(y, x * 2)
