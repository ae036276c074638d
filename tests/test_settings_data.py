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
    ({"GAN_EMA": "nan"}, "GAN_EMA"),
    ({"BETA": "nan"}, "BETA"),
    ({"BETA": "inf"}, "BETA"),
    ({"DFC_ALPHA": "-inf"}, "DFC_ALPHA"),
    ({"BATCH_SIZE": "1000", "N_TRAIN": "512"}, "BATCH_SIZE"),
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
    with pytest.raises(nb.SettingsError, match="did you mean dcgan"):
        nb.selected_models(settings(MODELS="dcgn"))
    assert nb.selected_models(settings(MODELS="all")) == list(nb.MODEL_REGISTRY)
    assert "mlp_gan" in nb.selected_models(settings(DATASET="mnist"))
    assert "mlp_gan" not in nb.selected_models(settings())


def preflight_cli(env, cwd=None):
    import os
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, str(Path(__file__).parent / "nbmodule.py"), "--preflight"],
                          env=full, capture_output=True, text=True, cwd=cwd)


def test_preflight_cli_exits_2_with_one_line(tmp_path):
    out = preflight_cli({"PROFILE": "nope"}, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: PROFILE='nope' is unknown: use one of auto, smoke, quick, full"]


def test_preflight_offline_cifar_unwritable_results_and_bad_checkpoint_dir(tmp_path):
    (tmp_path / "a_file").write_text("")
    out = preflight_cli({"PROFILE": "quick", "DATASET": "cifar10", "DATA_DIR": str(tmp_path / "nothing"),
                         "RESULTS_DIR": str(tmp_path / "a_file" / "results"),
                         "CHECKPOINT_DIR": str(tmp_path / "a_file"), "DEVICE": "cpu"}, cwd=tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert any(line.startswith("error: RESULTS_DIR=") and "point RESULTS_DIR at a folder" in line for line in lines)
    assert any(line.startswith("error: CHECKPOINT_DIR=") for line in lines)
    assert any("DATASET=cifar10: not found" in line and "cifar-10-batches-py" in line for line in lines)


def test_misspelt_settings_are_named(nb):
    warnings = nb.misspelt_settings({"PROFIL": "smoke", "MODEL": "dcgan", "HOME": "/root", "PATH": "x"},
                                    list(nb.RULES))
    assert warnings == ["MODEL is not a setting and is ignored: did you mean MODELS?",
                        "PROFIL is not a setting and is ignored: did you mean PROFILE?"]


def test_every_parameter_has_exactly_one_rule(nb):
    assert list(nb.RULES) == list(notebook_parameters())


def test_output_folder_that_is_a_file(nb, settings, tmp_path):
    (tmp_path / "file").write_text("")
    errors = nb.output_folder_errors(settings(CHECKPOINT_DIR=tmp_path / "file"))
    assert len(errors) == 1 and errors[0].startswith("CHECKPOINT_DIR=") and "is a file" in errors[0]


def test_a_second_run_into_the_same_folders_is_refused_and_a_dead_ones_lock_taken_over(nb, settings, tmp_path):
    S = settings()
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time; sys.path.insert(0, {str(Path(__file__).parent)!r})
from nbmodule import load_notebook
nb = load_notebook()
S = nb.Settings(**{S.as_dict()!r})
nb.hold_run_locks(S)
print("locked", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(nb.UserError, match=f"in use by pid {holder.pid}"):
            nb.hold_run_locks(S, wait_seconds=0.2)
    finally:
        holder.kill()
        holder.wait()
    nb.hold_run_locks(S, wait_seconds=5)   # the lock file is still there, but nobody holds it
    nb.release_run_locks()


def test_kernel_exits_when_its_parent_is_killed(tmp_path):
    """exit_with_parent: kill -9 of the parent (reproduce.sh's driver) ends the child (the kernel)."""
    import os
    import signal
    import time
    child = f"""
import sys, time; sys.path.insert(0, {str(Path(__file__).parent)!r})
from nbmodule import load_notebook
load_notebook().exit_with_parent(poll_seconds=0.1)
time.sleep(60)
"""
    parent = subprocess.Popen([sys.executable, "-c", f"""
import subprocess, sys, time
p = subprocess.Popen([sys.executable, "-c", {child!r}], start_new_session=True)
print(p.pid, flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    time.sleep(8)  # the child imports torch and the notebook
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the child outlived its killed parent")


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
    assert data.classes == ("a", "b")
    again = nb.load_dataset(settings(DATASET="folder", DATA_DIR=root, N_TRAIN=100))  # from the cache
    assert torch.equal(again.train_x, data.train_x) and again.key == data.key


def test_class_sorted_folder_is_shuffled_before_any_prefix(nb, settings, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for cls in "abcde":
        _write_images(tmp_path / "imgs" / "train" / cls, 8, (32, 32))
        _write_images(tmp_path / "imgs" / "test" / cls, 4, (32, 32))
    data = nb.load_dataset(settings(DATASET="folder", DATA_DIR=tmp_path / "imgs", PROFILE="full", N_TRAIN=""))
    assert len(set(data.train_y[:10].tolist())) >= 3 and len(set(data.test_y[:8].tolist())) >= 3


def test_class_missing_from_test_keeps_labels_aligned(nb, settings, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "imgs"
    for cls, colour in (("airplane", 0), ("automobile", 255)):
        for split in ("train", "test"):
            if (split, cls) == ("test", "airplane"):
                continue
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((32, 32, 3), colour, np.uint8)).save(root / split / cls / f"{i}.png")
    data = nb.load_dataset(settings(DATASET="folder", DATA_DIR=root, N_TRAIN=100, BATCH_SIZE=2))
    assert data.classes == ("airplane", "automobile")
    assert set(data.test_y.tolist()) == {1} and (data.test_x == 255).all()   # automobile stays class 1
    assert "'airplane' has images only in train/" in capsys.readouterr().out


def test_flat_folder_is_one_unlabelled_class_with_a_seeded_test_split(nb, settings, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_images(tmp_path / "imgs", 20, (32, 32))
    data = nb.load_dataset(settings(DATASET="folder", DATA_DIR=tmp_path / "imgs", N_TRAIN=100, BATCH_SIZE=2))
    assert len(data.train_x) == 18 and len(data.test_x) == 2 and data.classes == ("all",)


def test_train_without_test_falls_back_to_a_split_and_says_so(nb, settings, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for cls in ("x", "y"):
        _write_images(tmp_path / "imgs" / "train" / cls, 10, (32, 32))
    (tmp_path / "imgs" / "test").mkdir()
    data = nb.load_dataset(settings(DATASET="folder", DATA_DIR=tmp_path / "imgs", N_TRAIN=100, BATCH_SIZE=2))
    assert len(data.train_x) == 18 and len(data.test_x) == 2
    assert "has no images in class folders: using a seeded 10% split" in capsys.readouterr().out


def test_unreadable_image_is_skipped_and_counted(nb, settings, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for cls in ("x", "y"):
        _write_images(tmp_path / "imgs" / cls, 5, (32, 32))
    (tmp_path / "imgs" / "x" / "broken.jpg").write_bytes(b"this is not a jpeg")
    data = nb.load_dataset(settings(DATASET="folder", DATA_DIR=tmp_path / "imgs", N_TRAIN=100, BATCH_SIZE=2))
    assert len(data.train_x) + len(data.test_x) == 10
    assert "skipped 1 unreadable file(s): broken.jpg" in capsys.readouterr().out


def test_images_of_every_mode_decode_to_the_right_8bit_rgb(nb, tmp_path):
    gray16 = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)       # up to 65472
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    decoded = nb.decode_image(tmp_path / "g16.png")
    assert decoded.shape == (3, 32, 32) and decoded.dtype == np.uint8
    assert abs(int(decoded[0, 31, 31]) - round(65472 / 257)) <= 1 and decoded[0, 0, 0] == 0   # scaled, not white
    Image.fromarray(np.zeros((32, 32, 4), np.uint8)).save(tmp_path / "clear.png")             # fully transparent
    assert (nb.decode_image(tmp_path / "clear.png") == 255).all()                             # white background
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(tmp_path / "red.jpg")
    r, g, b = nb.decode_image(tmp_path / "red.jpg")[:, 16, 16]
    assert r > 200 and g < 60 and b < 60
    palette = Image.new("P", (32, 32), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.save(tmp_path / "p.png")
    assert nb.decode_image(tmp_path / "p.png")[:, 5, 5].tolist() == [10, 200, 30]
    Image.fromarray(np.full((32, 32), 77, np.uint8)).save(tmp_path / "l.png")
    assert (nb.decode_image(tmp_path / "l.png") == 77).all()


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
