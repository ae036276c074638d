"""The evaluation and report stages on tiny trained models, with a stand-in for the Inception network
(features = the first 64 pixel values), so no Inception pass runs here."""
import csv
import json

import pytest
import torch
from PIL import Image


@pytest.fixture
def run(nb, settings, tiny_data, fake_inception):
    S = settings(EPOCHS=2, FID_SAMPLES=32, TRACK_EVERY=1)
    reference = nb.build_reference(tiny_data, S)
    trained = {name: nb.train_model(name, S, tiny_data, reference) for name in ("conv_vae", "dcgan", "vqvae")}
    return S, reference, trained


def by_metric(rows):
    return {r["metric"]: r for r in rows}


def test_each_model_gets_the_evaluations_its_capabilities_allow(nb, run, tiny_data):
    S, reference, trained = run
    vae, gan, vq = (nb.evaluate_model(trained[n], tiny_data, reference, S) for n in ("conv_vae", "dcgan", "vqvae"))
    for metric in ("fid", "kid", "precision", "recon_mse", "fid_recon", "elbo_kl", "probe_accuracy", "active_units",
                   "fid_gmm", "parameters"):
        assert metric in by_metric(vae.rows), metric
    gan_rows = by_metric(gan.rows)
    assert "loss_g_variance" in gan_rows and "recon_mse" not in gan_rows and "probe_accuracy" not in gan_rows
    assert "raw generator" in gan_rows["fid"]["note"]
    vq_rows = by_metric(vq.rows)
    assert "probe_accuracy" in vq_rows and "recon_mse" in vq_rows and "fid_gmm" not in vq_rows
    assert set(vae.images) == {"samples", "nearest", "recons", "interpolation"}
    assert set(gan.images) == {"samples", "nearest", "interpolation"}
    assert vae.images["nearest"].shape == (8 * 4, 3, 32, 32)   # 8 samples, each with its 3 nearest training images
    assert vae.images["samples"].shape == (64, 3, 32, 32) and vae.images["recons"].shape == (32, 3, 32, 32)
    for row, weights in [(r, "final, epoch 2") for r in vae.rows] + \
            [(r, "final, epoch 2, raw generator (GAN_EMA=0)") for r in gan.rows]:
        if not row["metric"].startswith("best") and not row["metric"].endswith("_best"):
            assert (row["seed"], row["profile"], row["device"], row["weights"]) == (42, "smoke", "cpu", weights)
        else:
            assert row["weights"].startswith("best, epoch ")
    assert any("track_fid" in r for r in trained["conv_vae"].history)   # every sampler is tracked, not only GANs


def test_a_new_family_needs_no_change_to_the_evaluation(nb, tiny_data, settings, fake_inception):
    class Noise(nb.GenerativeModel):   # a model that can only sample
        def sample(self, n, **kw):
            return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    S = settings(FID_SAMPLES=16)
    model = Noise()
    model.w = torch.nn.Parameter(torch.zeros(1))
    history = [{"epoch": 1, "seconds": 1.0, "images_per_s": 10.0, "images_seen": 10}]
    trained = nb.TrainedModel("noise", model, history, {})
    rows = by_metric(nb.evaluate_model(trained, tiny_data, nb.build_reference(tiny_data, S), S).rows)
    assert "fid" in rows and "recon_mse" not in rows and rows["fid"]["value"] > 0


def test_evaluation_is_reused_only_for_the_same_stamp(nb, run, tiny_data, monkeypatch):
    S, reference, trained = run
    first = nb.evaluate_or_reuse(trained["dcgan"], tiny_data, reference, S)
    monkeypatch.setattr(nb, "evaluate_model", lambda *a: pytest.fail("should have been reused"))
    assert nb.evaluate_or_reuse(trained["dcgan"], tiny_data, reference, S).rows == first.rows
    changed = nb.TrainedModel("dcgan", trained["dcgan"].model, trained["dcgan"].history, {**trained["dcgan"].stamp,
                                                                                          "setting:width": 99})
    monkeypatch.setattr(nb, "evaluate_model", lambda *a: nb.Evaluation("dcgan", [], {}))
    assert nb.evaluate_or_reuse(changed, tiny_data, reference, S).rows == []   # recomputed


def test_one_class_data_reports_label_metrics_as_unavailable(nb, settings, tiny_data, fake_inception):
    one = nb.Dataset("folder", tiny_data.train_x, torch.zeros_like(tiny_data.train_y), tiny_data.test_x,
                     torch.zeros_like(tiny_data.test_y), key="one", classes=("all",))
    S = settings(EPOCHS=1, FID_SAMPLES=32)
    reference = nb.build_reference(one, S)
    rows = by_metric(nb.evaluate_model(nb.train_model("conv_vae", S, one), one, reference, S).rows)
    for metric in ("probe_accuracy", "classes_covered"):
        assert rows[metric]["value"] is None and "unavailable: one class" in rows[metric]["note"]
    sanity = {r["model"] + "/" + r["metric"]: r for r in nb.sanity_rows(one, reference, S)}
    assert "unavailable: one class" in sanity["raw pixels/probe_accuracy"]["note"]


def test_too_few_samples_give_unavailable_rows(nb, settings, tiny_data, fake_inception):
    S = settings(EPOCHS=1, FID_SAMPLES=3)
    reference = nb.build_reference(tiny_data, S)
    rows = by_metric(nb.evaluate_model(nb.train_model("dcgan", S, tiny_data), tiny_data, reference, S).rows)
    assert isinstance(rows["fid"]["value"], float)
    for metric in ("kid", "precision", "recall", "density"):
        assert rows[metric]["value"] is None and "too small" in rows[metric]["note"], metric


def test_diverged_model_rows_say_so(nb, tiny_data, settings, fake_inception):
    S = settings(FID_SAMPLES=16)
    model = nb.build_model("dcgan", S, tiny_data)
    never = nb.TrainedModel("dcgan", model, [], {}, diverged="dcgan diverged in epoch 1 (loss_d=nan)")
    rows = nb.evaluate_model(never, tiny_data, nb.build_reference(tiny_data, S), S).rows
    assert [(r["metric"], r["value"]) for r in rows] == [("status", "diverged")]


def test_report_writes_every_promised_file(nb, run, tiny_data, tmp_path):
    S, reference, trained = run
    evaluations = {n: nb.evaluate_or_reuse(t, tiny_data, reference, S) for n, t in trained.items()}
    rows = nb.write_report(nb.sanity_rows(tiny_data, reference, S), evaluations, trained, reference, tiny_data, S)
    results, figures, checkpoints = tmp_path / "results", tmp_path / "figures", tmp_path / "checkpoints"
    with open(results / "metrics.csv") as f:
        assert next(csv.reader(f)) == nb.METRIC_COLUMNS
    assert {r["model"] for r in csv.DictReader(open(results / "comparison.csv"))} == set(trained)
    probe = {r["model"] for r in csv.DictReader(open(results / "linear_probe.csv"))}
    assert {"raw pixels", "conv_vae", "vqvae"} <= probe
    for path in (results / "gan_samples.png", results / "vae_recons.png", figures / "samples_overview.png",
                 figures / "class_histograms.png", figures / "precision_recall.png", figures / "training_tracking.png",
                 figures / "conv_vae_curves.png", figures / "dcgan_interpolation.png", results / "dcgan" / "samples.png"):
        with Image.open(path) as im:
            im.verify()
    for name in ("vae_model.pth", "gan_model.pth"):
        assert all(torch.is_tensor(v) for v in torch.load(checkpoints / name, weights_only=True).values())
    saved = json.loads((results / "conv_vae" / "metrics.json").read_text())
    assert saved["stamp"]["model"] == "conv_vae" and saved["rows"]
    assert "fid_train_vs_test" in (results / "fid.txt").read_text() and len(rows) > 50


def test_a_profile_without_budget_for_extra_image_sets_says_so(nb, tiny_data, settings, fake_inception):
    S = nb.Settings(**{**settings(EPOCHS=1, FID_SAMPLES=16).as_dict(), "profile": "quick"})
    trained = nb.train_model("conv_vae", S, tiny_data)
    rows = by_metric(nb.evaluate_model(trained, tiny_data, nb.build_reference(tiny_data, S), S).rows)
    for metric in ("fid_gmm", "kid_gmm", "fid_recon", "kid_recon"):
        assert rows[metric]["value"] is None
        assert rows[metric]["note"] == "unavailable: not in this profile's budget (PROFILE=quick: one Inception pass " \
                                       "per extra image set)"
    assert rows["recon_mse"]["value"] > 0 and rows["fid"]["value"] is not None   # what the budget keeps
