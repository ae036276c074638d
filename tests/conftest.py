import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from nbmodule import load_notebook, notebook_parameters  # noqa: E402


@pytest.fixture(scope="session")
def nb():
    return load_notebook()


def tiny_settings(nb, folder, **overrides):
    """Settings for tiny CPU runs, all outputs under folder."""
    env = {"PROFILE": "smoke", "DEVICE": "cpu", "WIDTH": "4", "BATCH_SIZE": "16", "N_TRAIN": "64",
           "RESULTS_DIR": str(folder / "results"), "CHECKPOINT_DIR": str(folder / "checkpoints"),
           "FIGURES_DIR": str(folder / "figures"), "TRACK_EVERY": "0", "SAMPLE_EVERY": "0",
           "DFC_NETWORK": "cnn", **{k: str(v) for k, v in overrides.items()}}
    return nb.resolve_settings(notebook_parameters(), env, cuda_available=False)


@pytest.fixture
def settings(nb, tmp_path):
    """Settings for tiny CPU runs, all outputs under tmp_path; override with settings(**{"EPOCHS": "2"})."""
    return lambda **overrides: tiny_settings(nb, tmp_path, **overrides)


@pytest.fixture
def tiny_data(nb):
    return make_tiny_data(nb)


def make_tiny_data(nb):
    x, y = nb.synthetic_images(64, 0)
    tx, ty = nb.synthetic_images(32, 1)
    t = torch.from_numpy
    return nb.Dataset("synthetic", t(x), t(y), t(tx), t(ty), key="tiny", classes=nb.synthetic_class_names())


@pytest.fixture
def fake_inception(nb, monkeypatch):
    """A stand-in for the Inception network (features = the first 64 pixel values): no Inception pass in tests."""
    install_fake_inception(nb, monkeypatch)


class FakeInceptionNet:
    """The stand-in network: features = the first 64 pixel values, no logits."""
    pipeline, source = "fake-64", "fake"

    def __call__(self, images, batch_size=None):
        return images.float().flatten(1)[:, :64].double().numpy() / 255, None


def install_fake_inception(nb, monkeypatch):
    net = FakeInceptionNet()
    monkeypatch.setattr(nb, "inception_features", lambda images, device: net(images))
    monkeypatch.setattr(nb, "cached_features", lambda images, key, device, *cache: net(images))
    monkeypatch.setattr(nb, "inception_net", lambda device: net)


def fake_inception_in(namespace):
    """run_script's after_cell: once the notebook defined its network cache, the stand-in is the CPU's network."""
    if "_INCEPTION" in namespace:
        namespace["_INCEPTION"].setdefault("cpu", FakeInceptionNet())


# `python -c SCRIPT_WITH_FAKE_INCEPTION` in a run's folder (with tests/ in it): `nbmodule.py --script`, with the
# stand-in network — for tests that compare two runs' numbers, which need any fixed features, not Inception's
SCRIPT_WITH_FAKE_INCEPTION = ("import sys; sys.path.insert(0, 'tests'); import conftest, nbmodule; "
                              "sys.exit(nbmodule.run_script(after_cell=conftest.fake_inception_in))")
