"""The whole notebook through the command reproduce.sh runs (preflight, then nbconvert with live output),
PROFILE=smoke, every model, in a temporary folder — then once more, which must reuse every checkpoint and
evaluation; then a changed setting against its checkpoints, which must end in one line and exit code 2."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from nbmodule import load_notebook

NBMODULE = str(Path(__file__).parent / "nbmodule.py")
SMOKE = {"PROFILE": "smoke", "MODELS": "all", "DEVICE": "cpu", "DFC_NETWORK": "cnn",
         "FID_SAMPLES": "10"}  # the fewest the 10-split Inception Score takes: the run's Inception passes are its cost


def reproduce(cwd, **env):
    """What `./reproduce.sh` runs: the preflight, then the notebook. Returns (exit code, stdout, stderr)."""
    import os
    full = {**os.environ, **SMOKE, **env}
    pre = subprocess.run([sys.executable, NBMODULE, "--preflight"], cwd=cwd, env=full, capture_output=True, text=True)
    if pre.returncode:
        return pre.returncode, pre.stdout, pre.stderr
    out = subprocess.run([sys.executable, NBMODULE, "--run"], cwd=cwd, env=full, capture_output=True, text=True)
    return out.returncode, out.stdout, out.stderr


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("e2e")
    first = reproduce(tmp_path)
    assert first[0] == 0, first[2][-3000:]
    history = (tmp_path / "results" / "dcgan" / "history.csv").read_text()
    second = reproduce(tmp_path)
    assert second[0] == 0, second[2][-3000:]
    return tmp_path, first[1], second[1], history


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
    assert list(probe[0]) == ["model", "accuracy", "n_test", "note"]
    assert {"raw pixels", "conv_vae", "vqvae"} <= {r["model"] for r in probe}
    assert all(0 <= float(r["accuracy"]) <= 1 for r in probe)
    fid_rows = [line.split("\t") for line in (results / "fid.txt").read_text().splitlines() if not line.startswith("#")]
    fids = {(r[0], r[1]): r for r in fid_rows}
    metrics = {(r["model"], r["metric"]): r for r in read_csv(results / "metrics.csv")}
    for model in ("dcgan", "conv_vae", "real data"):
        key = (model, "fid" if model != "real data" else "fid_train_vs_test")
        row = fids[key]  # fid.txt says what metrics.csv says, with its sample count and reference
        assert float(row[2]) == pytest.approx(float(metrics[key]["value"]), abs=5e-4)
        assert row[3] == f"samples={metrics[key]['n_samples']}" and row[4] == f"reference={metrics[key]['reference']}"
    for name in ("vae_model.pth", "gan_model.pth", "vqvae.pth"):
        state = torch.load(root / "checkpoints" / name, weights_only=True)
        assert state and all(torch.is_tensor(v) for v in state.values())
    for name in ("conv_vae_curves.png", "dcgan_curves.png", "conv_vae_interpolation.png", "samples_overview.png",
                 "class_histograms.png", "precision_recall.png", "training_tracking.png"):
        png_size(root / "figures" / name)
    assert (results / "notebook.executed.ipynb").exists() and "training dcgan" in (results / "run.log").read_text()


def test_metrics_cover_every_model(run):
    results = run[0] / "results"
    rows = read_csv(results / "metrics.csv")
    assert list(rows[0]) == load_notebook().METRIC_COLUMNS
    assert {r["metric"] for r in rows} <= set(load_notebook().METRICS)  # every metric written has its record
    models = set(load_notebook().MODEL_REGISTRY)
    by_model = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["metric"]] = r
    assert models | {"real data", "raw pixels"} == set(by_model)
    for name in models:
        m = by_model[name]
        for metric in ("fid", "kid", "is", "precision", "recall", "f1", "density", "coverage", "classes_covered",
                       "class_kl_uniform", "diversity", "parameters", "train_seconds", "images_per_s"):
            assert metric in m, (name, metric)
        assert m["fid"]["n_samples"] == "10" and m["fid"]["profile"] == "smoke" and m["fid"]["seed"] == "42"
        if m["is"]["value"] == "":  # offline: no classifier head, and the row says so
            assert m["is"]["note"].startswith("unavailable: no Inception classifier head")
        else:
            assert 1.0 <= float(m["is"]["value"]) <= 10  # exp(KL) of 10 samples' predictions is at most 10
        assert len(json.loads(m["class_histogram"]["value"])) == 10
        (results / name / "samples.png").stat()
    for vae in ("conv_vae", "sigma_vae", "fc_vae", "resnet_vae", "dfc_vae", "mlp_vae"):
        for metric in ("recon_mse", "recon_psnr", "fid_recon", "elbo_kl", "neg_elbo", "bits_per_dim", "active_units",
                       "probe_accuracy", "probe_accuracy_hidden", "fid_gmm"):
            assert metric in by_model[vae], (vae, metric)
    assert by_model["sigma_vae"]["bits_per_dim"]["value"] != "" and "unavailable" in by_model["mlp_vae"]["bits_per_dim"]["note"]
    for sampler in ("conv_vae", "dcgan", "sngan_resnet", "wgan_gp_resnet"):   # tracked in smoke: a best checkpoint
        assert {"best_epoch", "fid_best", "kid_best"} <= set(by_model[sampler]), sampler
        assert by_model[sampler]["fid_best"]["weights"].startswith("best, epoch")
    assert "feature network" in by_model["dfc_vae"]["fid"]["note"]
    for gan in ("dcgan", "wgan_gp", "sn_dcgan", "mlp_gan"):
        assert "loss_g_variance" in by_model[gan]
    assert "fid_train_vs_test" in by_model["real data"]
    comparison = read_csv(results / "comparison.csv")
    assert {r["model"] for r in comparison} == models
    labels = [m.label for m in load_notebook().metrics_in("comparison")]
    assert list(comparison[0])[1:len(labels) + 1] == labels
    dcgan = next(r for r in comparison if r["model"] == "dcgan")
    assert float(dcgan["FID"]) == float(by_model["dcgan"]["fid"]["value"])
    assert "| model |" in (results / "comparison.md").read_text()
    assert "| model | metric |" in (results / "metrics.md").read_text()


def test_histories_carry_tracking_seed_and_stage_histories(run):
    results = run[0] / "results"
    dcgan = read_csv(results / "dcgan" / "history.csv")
    assert len(dcgan) == 2 and dcgan[-1]["track_kid"] != "" and float(dcgan[-1]["images_per_s"]) > 0
    assert int(dcgan[-1]["images_seen"]) == 2 * int(dcgan[0]["images_seen"]) > 0     # time-to-quality axes
    assert float(dcgan[-1]["elapsed_s"]) >= float(dcgan[0]["elapsed_s"]) > 0
    assert {r["seed"] for r in dcgan} == {"42"}
    vq = read_csv(results / "vqvae" / "history.csv")
    assert float(vq[-1]["perplexity"]) >= 1 and "codes_used" in vq[-1]
    assert (results / "vqvae_prior" / "history.csv").exists()


def test_live_progress_and_rerun_reuses_everything(run):
    root, first, second, history = run
    assert "not retraining" not in first and f"[1/{len(load_notebook().MODEL_REGISTRY)}] training conv_vae" in first and "ETA" in first
    assert second.count("not retraining") >= len(load_notebook().MODEL_REGISTRY)
    assert second.count("evaluation reused") == len(load_notebook().MODEL_REGISTRY)
    assert (root / "results" / "dcgan" / "history.csv").read_text() == history


def test_changed_setting_against_old_checkpoints_stops_in_the_preflight(run):
    code, _, err = reproduce(run[0], WIDTH="16")
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err and lines
    assert all(line.startswith("error: CHECKPOINT_DIR:") and "width 8 → 16" in line for line in lines)

