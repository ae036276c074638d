"""The whole notebook, PROFILE=smoke, every model, into a temporary folder — then once more, which must
reuse the checkpoints instead of retraining."""
import csv
import json

import nbformat
import pytest
import torch
from nbclient import NotebookClient
from PIL import Image

from nbmodule import NOTEBOOK, load_notebook

METRICS_COLUMNS = ["model", "metric", "value", "spread", "n_samples", "reference", "note", "profile", "device", "dataset"]


def execute(tmp_path, monkeypatch):
    for key, value in {"PROFILE": "smoke", "MODELS": "all", "DEVICE": "cpu", "DFC_NETWORK": "cnn"}.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    return "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("e2e")
    with pytest.MonkeyPatch.context() as mp:
        first = execute(tmp_path, mp)
        history = (tmp_path / "results" / "dcgan" / "history.csv").read_text()
        second = execute(tmp_path, mp)
    return tmp_path, first, second, history


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def png_size(path):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_promised_results_exist_and_are_well_formed(run):
    root = run[0]
    results = root / "results"
    assert png_size(results / "gan_samples.png") == (8 * 34 + 2, 8 * 34 + 2)  # 8×8 grid of 32px + 2px padding
    width, height = png_size(results / "vae_recons.png")
    assert width == 8 * 34 + 2 and height == 4 * 34 + 2                       # originals / reconstructions ×2
    probe = read_csv(results / "linear_probe.csv")
    assert list(probe[0]) == ["model", "accuracy", "features", "n_train", "n_test"]
    assert probe[0]["model"].startswith("raw pixels") and {"conv_vae", "vqvae"} <= {r["model"] for r in probe}
    assert all(0 <= float(r["accuracy"]) <= 1 for r in probe)
    fid_rows = [line.split("\t") for line in (results / "fid.txt").read_text().splitlines() if not line.startswith("#")]
    fids = {(r[0], r[1]): r for r in fid_rows}
    for model in ("dcgan", "conv_vae", "real data"):
        row = fids[(model, "fid" if model != "real data" else "fid_train_vs_test")]
        assert float(row[2]) >= 0 and row[3].startswith("samples=") and row[4].startswith("reference=")
    for name in ("vae_model.pth", "gan_model.pth", "vqvae.pth"):
        state = torch.load(root / "checkpoints" / name, weights_only=True)
        assert state and all(torch.is_tensor(v) for v in state.values())
    for name in ("conv_vae_curves.png", "dcgan_curves.png", "conv_vae_interpolation.png", "samples_overview.png",
                 "class_histograms.png", "precision_recall.png", "gan_tracking.png"):
        png_size(root / "figures" / name)


def test_metrics_cover_every_model(run):
    results = run[0] / "results"
    rows = read_csv(results / "metrics.csv")
    assert list(rows[0]) == METRICS_COLUMNS
    models = set(load_notebook().MODEL_REGISTRY)
    by_model = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["metric"]] = r
    assert models | {"real data"} == set(by_model)
    for name in models:
        m = by_model[name]
        for metric in ("fid", "kid", "is", "precision", "recall", "f1", "density", "coverage", "classes_covered",
                       "class_kl_uniform", "diversity", "parameters", "train_seconds", "images_per_s"):
            assert metric in m, (name, metric)
        assert m["fid"]["n_samples"] == "16" and m["fid"]["profile"] == "smoke"
        assert m["is"]["value"] != "" or "unavailable" in m["is"]["note"]
        assert len(json.loads(m["class_histogram"]["value"])) == 10
        (results / name / "samples.png").stat()
    for vae in ("conv_vae", "fc_vae", "resnet_vae", "dfc_vae", "mlp_vae"):
        for metric in ("recon_mse", "recon_psnr", "fid_recon", "elbo_kl", "active_units", "probe_accuracy", "fid_gmm"):
            assert metric in by_model[vae], (vae, metric)
    assert "feature network" in by_model["dfc_vae"]["fid"]["note"]
    for gan in ("dcgan", "wgan_gp", "sn_dcgan", "mlp_gan"):
        assert "loss_g_variance" in by_model[gan]
    assert "fid_train_vs_test" in by_model["real data"]
    comparison = read_csv(results / "comparison.csv")
    assert {r["model"] for r in comparison} == models
    assert "| model |" in (results / "comparison.md").read_text()
    assert "| model | metric |" in (results / "metrics.md").read_text()


def test_gan_tracking_and_vqvae_stats_in_history(run):
    results = run[0] / "results"
    dcgan = read_csv(results / "dcgan" / "history.csv")
    assert len(dcgan) == 2 and dcgan[-1]["track_kid"] != "" and float(dcgan[-1]["images_per_s"]) > 0
    vq = read_csv(results / "vqvae" / "history.csv")
    assert float(vq[-1]["perplexity"]) >= 1 and "codes_used" in vq[-1]
    assert (results / "vqvae_prior" / "history.csv").exists()


def test_rerun_resumes_instead_of_retraining(run):
    root, first, second, history = run
    assert "not retraining" not in first
    assert second.count("not retraining") >= len(load_notebook().MODEL_REGISTRY)
    assert (root / "results" / "dcgan" / "history.csv").read_text() == history
