"""Literature-grade models and schedules: standard architectures, budgets in generator steps, learning-rate
decay, EMA warm-up, the best checkpoint, the calibrated VAE decoder and its bits/dim, the probe's two views,
and the `full` profile's code paths run end to end on the CPU with tiny overrides."""
import json
import math

import pytest
import torch
import torch.nn as nn

from nbmodule import notebook_parameters


def output_shapes(module, x, kind):
    """Output shapes of every submodule of type `kind` during module(x)."""
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))
             for m in module.modules() if isinstance(m, kind)]
    module.eval()(x)
    for h in hooks:
        h.remove()
    return shapes


def test_full_profile_has_standard_widths_and_ema(nb):
    S = nb.resolve_settings(notebook_parameters(), {"PROFILE": "full", "DEVICE": "cpu"}, cuda_available=False)
    assert (S.width, S.gan_ema, S.select_by, S.track_samples) == (128, 0.9999, "fid", 5000)
    paper = nb.resolve_settings(notebook_parameters(), {"PROFILE": "paper"}, cuda_available=True)
    assert paper.batch_size == 64 and paper.device == "cuda"


def test_dcgan_generator_is_512_256_128_at_4_8_16_px(nb, settings, tiny_data):
    model = nb.build_model("dcgan", settings(WIDTH=128), tiny_data)
    shapes = output_shapes(model.generator, torch.randn(2, 100), nn.ConvTranspose2d)
    assert shapes == [(512, 4, 4), (256, 8, 8), (128, 16, 16), (3, 32, 32)]


def test_sn_dcgan_is_the_sngan_standard_cnn(nb, settings, tiny_data):
    model = nb.build_model("sn_dcgan", settings(WIDTH=128), tiny_data)
    d_convs = [(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0])
               for m in model.discriminator.modules() if isinstance(m, nn.Conv2d)]
    assert d_convs == [(3, 64, 3, 1), (64, 64, 4, 2), (64, 128, 3, 1), (128, 128, 4, 2), (128, 256, 3, 1),
                       (256, 256, 4, 2), (256, 512, 3, 1)]
    assert {m.negative_slope for m in model.discriminator.modules() if isinstance(m, nn.LeakyReLU)} == {0.1}
    weighted = [m for m in model.discriminator.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weighted) == 8 and all(nn.utils.parametrize.is_parametrized(m) for m in weighted)
    assert model.latent_dim == 128 and model.loss == "hinge" and model.n_critic == 1
    shapes = output_shapes(model.generator, torch.randn(2, 128), (nn.ConvTranspose2d, nn.Conv2d))
    assert shapes == [(256, 8, 8), (128, 16, 16), (64, 32, 32), (3, 32, 32)]


@pytest.mark.parametrize("name, g_params, d_params", [("sngan_resnet", 4.28e6, 1.05e6),
                                                      ("wgan_gp_resnet", 1.20e6, 1.05e6)])
def test_resnet_gans_at_the_published_sizes(nb, settings, tiny_data, name, g_params, d_params):
    model = nb.build_model(name, settings(WIDTH=128), tiny_data)
    count = lambda net: sum(p.numel() for p in net.parameters())
    assert count(model.generator) == pytest.approx(g_params, rel=0.01)   # SN-GAN ResNet: 4.3M / 1.0M
    assert count(model.discriminator) == pytest.approx(d_params, rel=0.01)
    assert model.n_critic == 5 and model.lr_decay and model.latent_dim == 128
    small = nb.build_model(name, settings(WIDTH=8), tiny_data)
    assert small.generator(torch.randn(3, 128)).shape == (3, 3, 32, 32)
    assert small.discriminator(torch.randn(3, 3, 32, 32)).shape == (3, 1)


def test_generator_step_budgets_become_epochs(nb, settings):
    S = settings(BATCH_SIZE=64)
    quick = nb.Settings(**{**S.as_dict(), "profile": "quick", "epochs": 0})
    assert nb.model_epochs("sngan_resnet", quick, 8000, n_critic=5) == math.ceil(25 * 5 / 125)
    assert nb.model_epochs("dcgan", quick, 8000) == 32                         # ⌈4000 / 125 batches⌉
    assert nb.model_epochs("conv_vae", quick, 8000) == 8                       # VAEs count epochs
    assert nb.model_epochs("dcgan", nb.Settings(**{**quick.as_dict(), "epochs": 3}), 8000) == 3   # EPOCHS wins
    paper = nb.Settings(**{**quick.as_dict(), "profile": "paper", "models": ()})
    assert nb.budget_text("sngan_resnet", paper, 50000, n_critic=5) == "100000 G steps → 641 epochs = 100124 G steps"
    assert nb.budget_text("sngan_resnet", paper, 64 * 500, n_critic=5) == "100000 G steps"   # whole epochs: exact
    assert nb.budget_text("dcgan", quick, 50000) == "4000 G steps → 6 epochs = 4686 G steps"  # the real budget
    assert set(nb.selected_models(paper)) == {"dcgan", "sn_dcgan", "sngan_resnet", "wgan_gp_resnet"}


def test_learning_rates_decay_linearly_to_zero(nb, settings, tiny_data):
    model = nb.build_model("sngan_resnet", settings(WIDTH=4), tiny_data)
    model.train()
    model.start_epoch(0, 1)
    model.total_steps = 10
    for _ in range(4):
        model.train_step(tiny_data.train_x[:8])
    for key in ("g", "d"):   # the 4th step ran at 1 - 3/10 of the base rate
        assert model.optimizers[key].param_groups[0]["lr"] == pytest.approx(2e-4 * 0.7)
    model.step_count = 12
    model.train_step(tiny_data.train_x[:8])   # past the last step: the rate stays at 0
    assert model.optimizers["d"].param_groups[0]["lr"] == 0.0


def test_ema_decay_warms_up_over_generator_steps(nb, settings, tiny_data):
    model = nb.build_model("dcgan", settings(GAN_EMA=0.999), tiny_data)
    model.train()
    before = [p.detach().clone() for p in model.g_ema.parameters()]
    model.train_step(tiny_data.train_x[:8])
    raw, ema, old = next(model.generator.parameters()), next(model.g_ema.parameters()), before[0]
    decay = min(0.999, 2 / 11)   # after generator step 1
    assert torch.allclose(ema, decay * old + (1 - decay) * raw, atol=1e-6)


def test_best_checkpoint_is_kept_and_reported_beside_the_final_weights(nb, settings, tiny_data, fake_inception,
                                                                         monkeypatch):
    S = settings(EPOCHS=3, FID_SAMPLES=32, TRACK_EVERY=1, TRACK_SAMPLES=16)
    reference = nb.build_reference(tiny_data, S)
    values = iter([0.5, 0.2, 0.3])      # tracked KID per epoch: the best is epoch 2
    monkeypatch.setattr(nb, "kid_from_features", lambda *a, **k: (next(values), 0.0) if k.get("subsets") == 20
                        else (0.1, 0.01))
    trained = nb.train_model("dcgan", S, tiny_data, reference)
    best = json.loads((nb.Path(S.checkpoint_dir) / "dcgan" / "best.json").read_text())
    assert (best["epoch"], best["metric"], best["value"]) == (2, "track_kid", 0.2)
    rows = {r["metric"]: r for r in nb.evaluate_model(trained, tiny_data, reference, S).rows}
    assert rows["best_epoch"]["value"] == 2 and str(tiny_data.train_x.shape[0] // 16 * 16 * 2) in rows["best_epoch"]["note"]
    assert rows["fid_best"]["weights"] == "best, epoch 2, raw generator (GAN_EMA=0)"   # which weights sampled
    assert rows["fid"]["weights"].startswith("final, epoch 3") and best["weights"] == "raw generator (GAN_EMA=0)"
    assert rows["fid_best"]["value"] != rows["fid"]["value"]                  # other weights, other samples
    assert torch.equal(next(trained.model.parameters()),                     # the final weights are back
                       nb.read_checkpoint(nb.Path(S.checkpoint_dir) / "dcgan" / "last.pt")["model"]["generator.1.weight"])


def test_calibrated_decoder_is_the_gaussian_likelihood_at_the_optimal_sigma(nb, settings, tiny_data):
    x = tiny_data.train_x[:4]
    logits = torch.randn(4, 3, 32, 32)
    fixed = nb.build_model("conv_vae", settings(), tiny_data)
    calibrated = nb.build_model("sigma_vae", settings(), tiny_data)
    assert fixed.sigma == "fixed" and calibrated.sigma == "calibrated"
    mean, target, d = torch.sigmoid(logits), x.float() / 255, 3 * 32 * 32
    sse = (mean - target).pow(2).flatten(1).sum(1)
    assert torch.allclose(fixed.decoder_nll(logits, x), sse + d / 2 * math.log(math.pi))   # σ² = ½
    var = sse.mean() / d
    gaussian = torch.distributions.Normal(mean, var.sqrt()).log_prob(target).flatten(1).sum(1)
    assert torch.allclose(calibrated.decoder_nll(logits, x), -gaussian, rtol=1e-4)
    assert nb.build_model("conv_vae", settings(VAE_SIGMA="calibrated"), tiny_data).sigma == "calibrated"
    with pytest.raises(nb.SettingsError, match="VAE_SIGMA"):
        settings(VAE_SIGMA="learned")


def test_elbo_rows_in_nats_and_bits_per_dim(nb, settings, tiny_data, fake_inception):
    S = settings(FID_SAMPLES=16)
    model = nb.build_model("sigma_vae", S, tiny_data)
    ctx = nb.EvalContext("sigma_vae", model, tiny_data, None, S, [])
    rows = {r["metric"]: r["value"] for r in nb.elbo_rows(ctx)[0]}
    assert rows["neg_elbo"] == pytest.approx(rows["elbo_recon"] + rows["elbo_kl"])
    d = 3 * 32 * 32
    assert rows["bits_per_dim"] == pytest.approx((rows["neg_elbo"] + d * math.log(255)) / (d * math.log(2)))
    mlp = nb.build_model("mlp_vae", S, tiny_data)
    bits = [r for r in nb.elbo_rows(nb.EvalContext("mlp_vae", mlp, tiny_data, None, S, []))[0]
            if r["metric"] == "bits_per_dim"][0]
    assert bits["value"] is None and "Bernoulli" in bits["note"]


@pytest.mark.parametrize("name, dims", [("conv_vae", 32), ("fc_vae", 512), ("resnet_vae", 32), ("vqvae", 32)])
def test_hidden_features_are_the_pooled_last_hidden_layer(nb, settings, tiny_data, name, dims):
    model = nb.build_model(name, settings(WIDTH=8), tiny_data).eval()
    assert model.hidden_features(tiny_data.test_x[:5]).shape == (5, dims)


def test_probe_uses_every_training_image_and_both_views(nb, settings, tiny_data):
    S = settings()
    model = nb.build_model("conv_vae", S, tiny_data)
    ctx = nb.EvalContext("conv_vae", model, tiny_data, None, S, [])
    row = nb.probe_rows(ctx)[0][0]
    hidden = nb.hidden_probe_rows(ctx)[0][0]
    assert f"all {len(tiny_data.train_x)} train images" in row["note"] and row["value"] is not None
    assert hidden["metric"] == "probe_accuracy_hidden" and "16-d" in hidden["note"]   # WIDTH 4: 4w channels


def test_the_raw_pixel_baseline_trains_on_the_same_images_as_every_models_probe(nb, settings, tiny_data):
    S = settings()
    ref = nb.build_reference(tiny_data, S)
    pixels = next(r for r in nb.sanity_rows(tiny_data, ref, S) if r["model"] == "raw pixels")
    assert pixels["metric"] == "probe_accuracy" and isinstance(pixels["value"], float)
    assert f"refit on all {len(tiny_data.train_x)} train images" in pixels["note"] and "chosen on a held-out" in pixels["note"]


def test_full_profile_code_paths_run_on_the_cpu(nb, tiny_data, tmp_path, fake_inception):
    """PROFILE=full with tiny overrides: wide-net builders, EMA on, tracking by FID, best checkpoint, LR decay."""
    env = {"PROFILE": "full", "DEVICE": "cpu", "DATASET": "synthetic", "WIDTH": "8", "BATCH_SIZE": "16",
           "N_TRAIN": "64", "FID_SAMPLES": "24", "TRACK_SAMPLES": "24", "TRACK_EVERY": "1", "SAMPLE_EVERY": "1",
           "EPOCHS": "2", "RESULTS_DIR": str(tmp_path / "r"), "CHECKPOINT_DIR": str(tmp_path / "c"),
           "FIGURES_DIR": str(tmp_path / "f"), "DFC_NETWORK": "cnn"}
    S = nb.resolve_settings(notebook_parameters(), env, cuda_available=False)
    assert S.gan_ema == 0.9999 and S.select_by == "fid"
    reference = nb.build_reference(tiny_data, S)
    for name in ("sngan_resnet", "sigma_vae", "vqvae"):
        trained = nb.train_model(name, S, tiny_data, reference)
        # the VQ-VAE cannot sample before its prior stage, so only the other two are tracked
        assert len(trained.history) == 2 and ("track_fid" in trained.history[-1]) == (name != "vqvae")
        rows = {r["metric"]: r for r in nb.evaluate_model(trained, tiny_data, reference, S).rows}
        assert rows["fid"]["profile"] == "full" and rows["fid"]["value"] is not None
        if name == "sngan_resnet":
            assert trained.model.g_ema is not None and "EMA generator" in rows["fid"]["weights"]
            assert trained.model.optimizers["g"].param_groups[0]["lr"] < 2e-4     # decayed
            assert json.loads((tmp_path / "c" / name / "best.json").read_text())["metric"] == "track_fid"
            assert "best_epoch" in rows
