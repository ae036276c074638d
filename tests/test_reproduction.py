"""What surrounds the GAN update rules, as the published configurations have it: the EMA generator's own
batch-norm statistics, augmentation of real batches only, fresh generator noise of the configured batch,
initialisation, and the published-vs-ours table."""
import copy
import types

import pytest
import torch

from conftest import install_fake_inception


def batch_norms(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def test_the_ema_generator_samples_with_statistics_of_its_own_weights(nb, settings, tiny_data):
    model = nb.build_model("dcgan", settings(GAN_EMA="0.5"), tiny_data)
    for _ in range(4):
        model.train_step(tiny_data.train_x[:16])
    model.sample(4)
    # the statistics a plain average of 20 noise batches gives the EMA weights, recomputed here by hand
    probe, means = copy.deepcopy(model.g_ema).train(), []
    first = batch_norms(probe)[0]
    first.register_forward_hook(lambda m, inputs, out: means.append(inputs[0].mean((0, 2, 3))))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(20):
            probe(torch.randn(256, model.latent_dim, generator=gen))
    ema_bn, raw_bn = batch_norms(model.g_ema)[0], batch_norms(model.generator)[0]
    assert torch.allclose(ema_bn.running_mean, torch.stack(means).mean(0), atol=1e-5)
    assert not torch.allclose(ema_bn.running_mean, raw_bn.running_mean, atol=1e-3)  # not the raw generator's
    assert "its own batch-norm statistics" in model.sampling_weights()


def test_every_gan_with_an_ema_copy_also_reports_its_raw_generator(nb, settings, tiny_data, monkeypatch, tmp_path):
    install_fake_inception(nb, monkeypatch)
    for ema, expected in (("0.9", {"fid_raw", "kid_raw"}), ("0", set())):
        S = settings(GAN_EMA=ema, FID_SAMPLES=16, EPOCHS=1, CHECKPOINT_DIR=tmp_path / f"ema{ema}")
        trained = nb.train_model("dcgan", S, tiny_data)
        rows = nb.evaluate_model(trained, tiny_data, nb.build_reference(tiny_data, S), S).rows
        raw = {r["metric"]: r for r in rows if r["metric"].endswith("_raw")}
        assert set(raw) == expected
        assert all(r["weights"].startswith("raw generator") and r["n_samples"] == 16 for r in raw.values())


def test_augmentations_keep_images_and_only_touch_real_batches(nb, settings, tiny_data):
    x = nb.to_signed(tiny_data.train_x[:32])
    torch.manual_seed(0)
    flipped = nb.AUGMENTS["flip"](x)
    same, mirrored = (flipped == x).flatten(1).all(1), (flipped == x.flip(3)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()
    noise = nb.AUGMENTS["dequant"](x) - x
    assert noise.min() >= 0 and noise.max() < 1 / 128 and noise.std() > 0
    model = nb.build_model("dcgan", settings(), tiny_data)
    seen = []
    model.augment_real = lambda batch: seen.append(batch.clone()) or batch
    model.train_step(tiny_data.train_x[:16])
    assert len(seen) == 1 and torch.equal(seen[0], nb.to_signed(tiny_data.train_x[:16]))  # the real batch only


def test_augmentation_follows_the_model_or_the_setting_and_is_stamped(nb, settings, tiny_data):
    assert {n: nb.build_model(n, settings(), tiny_data).augment for n in ("dcgan", "sngan_resnet", "mlp_gan")} \
        == {"dcgan": "flip", "sngan_resnet": "dequant", "mlp_gan": "none"}
    model = nb.build_model("dcgan", settings(AUGMENT="none"), tiny_data)
    assert model.augment == "none" and model.shaped_by["augment"] == "none"
    with pytest.raises(nb.SettingsError, match="AUGMENT='mirror' is unknown"):
        settings(AUGMENT="mirror")


@pytest.mark.parametrize("name, g_batch", [("dcgan", 2), ("sngan_resnet", 2), ("wgan_gp", 1)])
def test_the_generator_step_draws_fresh_noise_of_the_configured_batch(nb, settings, tiny_data, name, g_batch):
    model = nb.build_model(name, settings(), tiny_data)
    noise = []
    model.generator.register_forward_pre_hook(lambda m, inputs: noise.append(inputs[0].clone()))
    for _ in range(model.n_critic):
        model.train_step(tiny_data.train_x[:16])
    assert [len(z) for z in noise] == [16] * model.n_critic + [g_batch * 16]
    assert not any(torch.equal(noise[-1][:16], z) for z in noise[:-1])  # not the discriminator's noise again


def test_initialisation_follows_each_configuration(nb, settings, tiny_data):
    dcgan = nb.build_model("dcgan", settings(WIDTH=16), tiny_data)
    convs = [m for m in dcgan.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    weights = torch.cat([m.weight.detach().flatten() for m in convs])
    assert weights.std() == pytest.approx(0.02, rel=0.1) and weights.mean().abs() < 0.002
    assert all(m.bias is None or not m.bias.any() for m in convs)
    bn = torch.cat([m.weight.detach() for m in batch_norms(dcgan.generator)])
    assert bn.mean() == pytest.approx(1.0, abs=0.01) and bn.std() == pytest.approx(0.02, rel=0.3)
    resnet = nb.build_model("sngan_resnet", settings(WIDTH=16), tiny_data)
    for m in resnet.modules():
        if isinstance(m, torch.nn.Conv2d):
            w = m.parametrizations.weight.original if torch.nn.utils.parametrize.is_parametrized(m, "weight") \
                else m.weight
            fan_in, fan_out = w.shape[1] * w[0, 0].numel(), w.shape[0] * w[0, 0].numel()
            assert w.abs().max() <= (6 / (fan_in + fan_out)) ** 0.5 + 1e-6   # Xavier-uniform's bound
            assert m.bias is None or not m.bias.any()
    assert resnet.discriminator[-1].bias is None  # no output bias, as in the reference
    with pytest.raises(ValueError, match="initialisation 'he' is unknown"):
        nb.GAN(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1), 2, init="he")


def test_published_numbers_are_compared_only_at_their_protocol(nb, settings):
    history = [{"images_seen": 100000 * 64 * 5}]
    trained = {"sngan_resnet": types.SimpleNamespace(history=history, model=types.SimpleNamespace(n_critic=5))}
    row = lambda metric, n: {"model": "sngan_resnet", "metric": metric, "value": 15.0, "n_samples": n,
                             "weights": "final"}
    paper = nb.Settings(**{**settings().as_dict(), "profile": "paper", "dataset": "cifar10", "n_train": 0,
                           "batch_size": 64})
    data = types.SimpleNamespace(name="cifar10")
    line, = nb.published_rows([row("fid_raw", 50000), row("fid", 50000)], trained, paper, data)
    assert line["verdict"] == "comparable" and line["published_fid"] == 14.32 and line["ours_steps"] == 100000
    smoke = nb.Settings(**{**settings().as_dict(), "batch_size": 64})
    line, = nb.published_rows([row("fid", 16)], trained, smoke, types.SimpleNamespace(name="synthetic"))
    assert line["verdict"].startswith("not comparable: N = 16, not 50,000; data: synthetic")
    assert "not the reproduction's" in line["verdict"]
