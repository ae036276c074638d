"""The training engine (checkpoints, resume, determinism) and every model's surface."""
import math

import pytest
import torch

from nbmodule import load_notebook

GAN_LOSS_KEYS = {"loss_d", "d_real", "d_fake"}


def history_losses(history):
    timing = ("seconds", "images_per_s", "steady_images_per_s", "compile_s", "elapsed_s", "peak_memory_mb")
    return [{k: v for k, v in row.items() if k not in timing} for row in history]


def train(nb, S, data, name, epochs):
    model = nb.build_model(name, S, data)
    return model, nb.fit(model, data.train_x, S, name, epochs)


def test_resume_after_interruption_matches_uninterrupted_run(nb, settings, tiny_data, tmp_path):
    full = settings(RESULTS_DIR=tmp_path / "a", CHECKPOINT_DIR=tmp_path / "ca")
    _, uninterrupted = train(nb, full, tiny_data, "dcgan", 3)
    split = settings(RESULTS_DIR=tmp_path / "b", CHECKPOINT_DIR=tmp_path / "cb")
    train(nb, split, tiny_data, "dcgan", 1)                  # "killed" after epoch 1
    torch.manual_seed(1234)                                   # whatever the RNG did meanwhile
    resumed_model, resumed = train(nb, split, tiny_data, "dcgan", 3)
    assert history_losses(resumed) == history_losses(uninterrupted)
    assert (tmp_path / "b" / "dcgan" / "history.csv").read_text().count("\n") == 4  # header + 3 epochs


def test_finished_model_is_not_retrained(nb, settings, tiny_data):
    S = settings()
    model, history = train(nb, S, tiny_data, "conv_vae", 2)
    again = nb.build_model("conv_vae", S, tiny_data)
    assert nb.fit(again, tiny_data.train_x, S, "conv_vae", 2) == history
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_same_seed_same_history_on_cpu(nb, settings, tiny_data, tmp_path):
    runs = [history_losses(train(nb, settings(CHECKPOINT_DIR=tmp_path / f"c{i}"), tiny_data, "wgan_gp", 2)[1])
            for i in range(2)]
    assert runs[0] == runs[1]


def test_checkpoint_round_trip(nb, settings, tiny_data, tmp_path):
    S = settings()
    model = nb.build_model("dcgan", S, tiny_data)
    model.train_step(tiny_data.train_x[:16])  # optimizer state exists
    nb.save_checkpoint(tmp_path / "x.pt", model, 5, [{"epoch": 5, "loss": 1.5}])
    assert not list(tmp_path.glob(".*tmp"))  # written atomically, no temporary left
    fresh = nb.build_model("dcgan", settings(SEED=9), tiny_data)
    epoch, history = nb.load_checkpoint(tmp_path / "x.pt", fresh)
    assert (epoch, history) == (5, [{"epoch": 5, "loss": 1.5}])
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert fresh.optimizers["g"].state_dict()["state"].keys() == model.optimizers["g"].state_dict()["state"].keys()


class Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_checkpoint_with_arbitrary_objects_is_refused_with_the_fix(nb, settings, tiny_data, tmp_path):
    model = nb.build_model("dcgan", settings(), tiny_data)
    torch.save({"model": model.state_dict(), "optimizers": {}, "epoch": 1, "history": [], "evil": Payload()},
               tmp_path / "evil.pt")
    with pytest.raises(nb.UserError) as err:
        nb.load_checkpoint(tmp_path / "evil.pt", model)
    message = str(err.value)
    assert "evil.pt" in message and "delete it" in message and "weights_only=False" not in message
    assert "\n" not in message


@pytest.mark.parametrize("content", [b"", b"garbage" * 100, "truncated"])
def test_corrupt_checkpoint_is_one_line_naming_the_file(nb, settings, tiny_data, tmp_path, content):
    model = nb.build_model("dcgan", settings(), tiny_data)
    path = tmp_path / "last.pt"
    if content == "truncated":
        nb.save_checkpoint(path, model, 1, [])
        path.write_bytes(path.read_bytes()[:2000])
    else:
        path.write_bytes(content)
    with pytest.raises(nb.UserError, match=r"checkpoint .*last.pt .*delete it to retrain") as err:
        nb.load_checkpoint(path, model)
    assert "\n" not in str(err.value) and "weights_only=False" not in str(err.value)


def run_stages(nb, model, data, S, name, before):
    for stage in model.stages:
        if stage.before == before:
            nb.run_stage(stage, model, data, S, {})


MODEL_NAMES = list(load_notebook().MODEL_REGISTRY)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_trains_one_step_and_samples(nb, settings, tiny_data, name):
    S = settings(EPOCHS=1)
    model = nb.build_model(name, S, tiny_data)
    run_stages(nb, model, tiny_data, S, name, before=True)   # DFC-VAE: its feature CNN (1 epoch)
    model.train()
    model.start_epoch(0, 1)
    before = [p.detach().clone() for p in model.parameters()]
    out = model.train_step(tiny_data.train_x[:16])
    assert out and all(torch.isfinite(torch.as_tensor(v)).all() for v in out.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # an optimisation step happened
    if isinstance(model, nb.GAN):
        assert GAN_LOSS_KEYS <= set(out)
    run_stages(nb, model, tiny_data, S, name, before=False)  # VQ-VAE: its PixelCNN prior (1 epoch)
    assert model.can("sample")
    images = model.sample(5)
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.uint8
    if model.can("reconstruct"):
        assert model.reconstruct(tiny_data.test_x[:4]).shape == (4, 3, 32, 32)
    if model.can("encode"):
        assert model.encode(tiny_data.test_x[:4]).shape[0] == 4


def test_building_a_model_trains_nothing(nb, settings, tiny_data, tmp_path, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("building a model must not train")
    monkeypatch.setattr(nb, "fit", no_training)
    S = settings()
    for name in MODEL_NAMES:
        nb.build_model(name, S, tiny_data)
    assert not (tmp_path / "checkpoints").exists()


def test_capabilities_are_declared_not_kinds(nb, settings, tiny_data):
    S = settings()
    vae, gan, vq = (nb.build_model(n, S, tiny_data) for n in ("conv_vae", "dcgan", "vqvae"))
    assert all(vae.can(c) for c in ("sample", "interpolation", "reconstruct", "encode", "latents", "elbo_terms"))
    assert gan.can("sample") and gan.can("interpolation") and not gan.can("reconstruct") and not gan.can("encode")
    assert vq.can("reconstruct") and vq.can("encode") and not vq.can("latents") and not vq.can("interpolation")
    assert not vq.can("sample")  # until its prior stage ran
    assert not any(hasattr(m, "kind") for m in (vae, gan, vq))


def test_stamp_records_exactly_the_settings_a_builder_read(nb, settings, tiny_data):
    S = settings(BETA=2)
    assert {"width", "beta", "kl_warmup"} <= set(nb.build_model("conv_vae", S, tiny_data).shaped_by)
    gan = nb.build_model("dcgan", S, tiny_data).shaped_by
    assert "beta" not in gan and {"width", "gan_ema"} <= set(gan)


def test_resume_with_other_settings_stops_with_one_line(nb, settings, tiny_data, tmp_path):
    nb.train_model("conv_vae", settings(EPOCHS=1), tiny_data)
    with pytest.raises(nb.UserError) as err:
        nb.train_model("conv_vae", settings(EPOCHS=2, BETA=4), tiny_data)
    message = str(err.value)
    assert "CHECKPOINT_DIR" in message and "beta 1.0 → 4.0" in message and "\n" not in message
    with pytest.raises(nb.UserError, match="seed"):
        nb.train_model("conv_vae", settings(EPOCHS=2, SEED=7), tiny_data)
    # the preflight sees the same mismatch without loading any data
    assert any("beta" in e for e in nb.checkpoint_errors(settings(BETA=4), ["conv_vae"]))
    assert nb.checkpoint_errors(settings(), ["conv_vae"]) == []
    nb.train_model("dcgan", settings(EPOCHS=1), tiny_data)   # a GAN's stamp has no β: changing it does not matter
    assert nb.train_model("dcgan", settings(EPOCHS=1, BETA=4), tiny_data).history


def test_other_data_stops_resume(nb, settings, tiny_data):
    nb.train_model("dcgan", settings(EPOCHS=1), tiny_data)
    other = nb.Dataset("synthetic", tiny_data.train_x.flip(0), tiny_data.train_y, tiny_data.test_x,
                       tiny_data.test_y, key="other", classes=tiny_data.classes)
    with pytest.raises(nb.UserError, match="key"):
        nb.train_model("dcgan", settings(EPOCHS=2), other)


def test_fewer_epochs_than_the_checkpoint_holds_is_an_error(nb, settings, tiny_data):
    nb.train_model("dcgan", settings(EPOCHS=2), tiny_data)
    with pytest.raises(nb.UserError, match="holds 2 epochs but this run asks for 1"):
        nb.train_model("dcgan", settings(EPOCHS=1), tiny_data)


def test_batch_larger_than_the_data_is_an_error_not_a_result(nb, settings, tiny_data):
    with pytest.raises(nb.UserError, match="BATCH_SIZE=100 is larger than the 64 training images"):
        nb.train_model("dcgan", settings(BATCH_SIZE=100, N_TRAIN=1000), tiny_data)


def test_train_model_runs_stages_and_writes_final_weights(nb, settings, tiny_data, tmp_path):
    run = nb.train_model("vqvae", settings(EPOCHS=1), tiny_data)
    assert run.model.can("sample") and not run.diverged and len(run.history) == 1
    assert (tmp_path / "checkpoints" / "vqvae_prior" / "last.pt").exists()
    weights = torch.load(tmp_path / "checkpoints" / "vqvae.pth", weights_only=True)
    assert any(k.startswith("prior.") for k in weights)
    assert '"model": "vqvae"' in (tmp_path / "checkpoints" / "vqvae.json").read_text()


class Unstable(load_notebook().GenerativeModel):
    """Loss finite in epoch 1, NaN from epoch 2 on."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.optimizers = {"w": torch.optim.SGD([self.w], lr=0.1)}

    def train_step(self, x):
        loss = (self.w - 1).pow(2).sum() + (float("nan") if self.epoch >= 1 else 0.0)
        self.optimize("w", loss)
        return {"loss": loss}

    def sample(self, n, **kw):
        return torch.zeros(n, 3, 32, 32, dtype=torch.uint8)


def test_a_diverging_model_stops_keeps_its_last_good_checkpoint_and_is_marked(nb, settings, tiny_data, monkeypatch):
    monkeypatch.setitem(nb.MODEL_REGISTRY, "unstable", nb.ModelSpec("unstable", lambda S, d: Unstable(),
                                                                    {"smoke": 3}, None, "image", "test"))
    run = nb.train_model("unstable", settings(EPOCHS=3), tiny_data)
    assert "diverged in epoch 2" in run.diverged and "loss=nan" in run.diverged
    assert len(run.history) == 1 and torch.isfinite(run.model.w).all()  # the epoch-1 weights are back
    assert nb.train_model("dcgan", settings(EPOCHS=1), tiny_data).history  # the next model still trains


def test_vae_loss_falls_on_a_fixed_batch(nb, settings, tiny_data):
    model = nb.build_model("conv_vae", settings(WIDTH=8), tiny_data)
    model.train()
    batch = tiny_data.train_x[:16]
    # −ELBO in nats: the fixed-σ decoder's NLL is the squared error plus D/2·log π, a constant
    constant = 3 * 32 * 32 / 2 * math.log(math.pi)
    losses = [float(model.train_step(batch)["loss"].detach()) - constant for _ in range(40)]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_kl_warmup_ramps_beta(nb, settings, tiny_data):
    model = nb.build_model("conv_vae", settings(BETA=2, KL_WARMUP=3), tiny_data)
    betas = []
    for epoch in range(5):
        model.start_epoch(epoch, 5)
        betas.append(model.beta_now())
    assert betas == [0.5, 1.0, 1.5, 2.0, 2.0]


def test_gradient_penalty_of_a_linear_critic(nb):
    w = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)  # critic(x) = <w, x>: gradient w everywhere, norm 5
    critic = lambda x: (x * w).flatten(1).sum(1)
    real, fake = torch.randn(8, 2, 1, 1), torch.randn(8, 2, 1, 1)
    assert nb.gradient_penalty(critic, real, fake).item() == pytest.approx((5 - 1) ** 2)


def test_gan_updates_generator_every_n_critic_steps(nb, settings, tiny_data):
    model = nb.build_model("wgan_gp", settings(), tiny_data)
    model.train()
    model.start_epoch(0, 1)
    steps = [("loss_g" in model.train_step(tiny_data.train_x[:8])) for _ in range(10)]
    assert steps == [False, False, False, False, True] * 2
    assert int(model.steps) == 10 and "gp" in model.train_step(tiny_data.train_x[:8])


def test_gan_ema_generator_is_used_for_sampling(nb, settings, tiny_data):
    model = nb.build_model("dcgan", settings(GAN_EMA=0.5), tiny_data)
    model.train()
    for _ in range(3):
        model.train_step(tiny_data.train_x[:8])
    raw, ema = list(model.generator.parameters())[0], list(model.g_ema.parameters())[0]
    assert not torch.equal(raw, ema)
    z = torch.randn(2, 100)
    model.eval()
    assert torch.allclose(model.decode_latent(z), model.g_ema(z))


def test_standing_statistics_are_recomputed_only_when_the_ema_weights_change(nb, settings, tiny_data, monkeypatch):
    model = nb.build_model("dcgan", settings(GAN_EMA=0.5), tiny_data)
    calls = []
    refresh = nb.standing_statistics
    monkeypatch.setattr(nb, "standing_statistics", lambda *a: calls.append(1) or refresh(*a))
    first = model.sample(4, z=torch.randn(4, 100, generator=torch.Generator().manual_seed(1)))
    again = model.sample(4, z=torch.randn(4, 100, generator=torch.Generator().manual_seed(1)))
    assert len(calls) == 1 and torch.equal(first, again)     # unchanged weights: the statistics are reused
    model.train()
    for _ in range(2):
        model.train_step(tiny_data.train_x[:8])               # the EMA update writes the weights in place
    model.sample(4)
    assert len(calls) == 2
    model.load_state_dict({**model.state_dict(), "steps": torch.tensor(0)})   # a checkpoint of other weights
    model.sample(4)
    assert len(calls) == 3


def test_spectral_norm_bounds_the_largest_singular_value(nb):
    d = nb.dcgan_discriminator(3, 8, norm="sn")
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4
    with torch.no_grad():
        for conv in convs:  # weights the construction-time iterations have not seen
            conv.parametrizations.weight.original.mul_(3.0).add_(torch.randn_like(conv.parametrizations.weight.original))
    before = [torch.linalg.matrix_norm(conv.weight.flatten(1), ord=2).item() for conv in convs]
    d.train()
    d(torch.randn(4, 3, 32, 32))  # forwards never iterate: only refine_spectral_norms does
    assert [torch.linalg.matrix_norm(conv.weight.flatten(1), ord=2).item() for conv in convs] == before
    nb.refine_spectral_norms(d, 30)
    for conv in convs:
        sigma = torch.linalg.matrix_norm(conv.weight.flatten(1), ord=2)
        assert sigma.item() == pytest.approx(1.0, abs=0.05)


def test_a_compiled_spectral_norm_critic_takes_real_and_fake_before_one_backward(nb):
    """torch's own parametrization fails here (its power iteration inside the compiled forward, 1×1 conv)."""
    critic = torch.nn.Sequential(torch.nn.AvgPool2d(2), nb.spectral_norm(torch.nn.Conv2d(3, 8, 1)))
    critic.compile()
    real, fake = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    for _ in range(2):
        nb.refine_spectral_norms(critic)
        (critic(real).mean() - critic(fake).mean()).backward()
    assert critic[1].parametrizations.weight.original.grad is not None


def test_the_discriminator_step_refines_spectral_norms_once(nb, settings, tiny_data):
    model = nb.build_model("sn_dcgan", settings(), tiny_data)
    norm = next(m for m in model.discriminator.modules() if isinstance(m, nb.SpectralNorm))
    calls = []
    original = norm.power_iteration
    norm.power_iteration = lambda *a: (calls.append(a), original(*a))
    model.train()
    for _ in range(model.n_critic):  # the last of them also updates the generator
        model.train_step(tiny_data.train_x[:8])
    assert len(calls) == model.n_critic


def test_ema_codebook_moves_codes_towards_assigned_vectors(nb):
    vq = nb.VectorQuantizerEMA(codes=4, dim=2, decay=0.5, restart_below=0.0)
    vq.embedding.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0], [10.0, -10.0]]))
    vq.embed_sum.copy_(vq.embedding)
    vq.train()
    target = torch.tensor([1.0, 1.0])
    z = target.view(1, 2, 1, 1).expand(6, 2, 1, 1) + 0.01 * torch.randn(6, 2, 1, 1)
    _, idx, _, perplexity = vq(z)
    assert (idx == 0).all() and perplexity.item() == pytest.approx(1.0)
    assert vq.cluster_size[0] > vq.cluster_size[1:].max()          # usage counts follow assignments
    distance = (vq.embedding[0] - target).norm()
    assert 0 < distance < target.norm()                              # code 0 moved towards its vectors
    for _ in range(20):
        vq(z)
    assert (vq.embedding[0] - target).norm() < 0.05


def test_dead_codes_are_restarted(nb):
    vq = nb.VectorQuantizerEMA(codes=8, dim=2, decay=0.5, restart_below=0.5)
    vq.train()
    z = torch.randn(32, 2, 1, 1)
    for _ in range(5):
        vq(z)
    assert (vq.cluster_size >= 0.5).all()  # no code stays below the restart threshold


def test_code_prior_is_causal(nb):
    prior = nb.CodePrior(codes=16, positions=64, dim=16, layers=2, heads=2).eval()
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (1, 8, 8))
    base = prior.logits(codes)
    for i, j in [(0, 0), (3, 4), (7, 7)]:
        later = codes.clone().view(-1)
        later[i * 8 + j:] = torch.randint(0, 16, (64 - i * 8 - j,))   # change this position and all after it
        assert torch.allclose(prior.logits(later.view(1, 8, 8))[:, :, i, j], base[:, :, i, j], atol=1e-5)
    earlier = codes.clone()
    earlier[0, 3, 3] = (earlier[0, 3, 3] + 1) % 16
    assert not torch.allclose(prior.logits(earlier)[:, :, 3, 4], base[:, :, 3, 4])  # it does see the past
    # sampling reads only the prefix up to t; its logits at t are the full map's
    seq = codes.view(1, 64)
    for t in (0, 17, 63):
        assert torch.allclose(prior.sequence_logits(seq[:, :t + 1])[:, t], base.flatten(2)[:, :, t], atol=1e-5)
    maps = prior.generate(3, 8, 8)
    assert maps.shape == (3, 8, 8) and maps.min() >= 0 and maps.max() < 16


@pytest.mark.parametrize("name", ["conv_vae", "dcgan", "sngan_resnet"])
def test_the_engine_trains_exactly_what_the_plain_loop_trains(nb, settings, tiny_data, name):
    """fit = train_plainly + resume, history and acceleration: on the CPU its first epoch gives the same weights."""
    S = settings(EPOCHS=1)
    plain = nb.build_model(name, S, tiny_data)
    nb.train_plainly(plain, tiny_data.train_x, S.batch_size, 1, S.seed)
    engine = nb.build_model(name, S, tiny_data)
    nb.fit(engine, tiny_data.train_x, S, name, 1)
    for (key, a), b in zip(plain.state_dict().items(), engine.state_dict().values()):
        assert torch.equal(a, b), key
