"""Metric math on constructed inputs with known answers (no Inception network needed)."""
import math

import numpy as np
import pytest
import torch


def random_psd(rng, d):
    a = rng.standard_normal((d, 2 * d))
    return a @ a.T / (2 * d)


def test_frechet_distance_closed_form_for_diagonal_gaussians(nb):
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])   # variances
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert nb.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_equals_pytorch_fid(nb):
    from pytorch_fid.fid_score import calculate_frechet_distance
    rng = np.random.default_rng(0)
    mu1, mu2, s1, s2 = rng.standard_normal(64), rng.standard_normal(64), random_psd(rng, 64), random_psd(rng, 64)
    assert nb.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(calculate_frechet_distance(mu1, s1, mu2, s2),
                                                                  rel=1e-6)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_shift(nb):
    feats = np.random.default_rng(1).standard_normal((500, 16))
    assert abs(nb.fid_from_features(feats, feats)) < 1e-8
    assert nb.fid_from_features(feats, feats + 0.5) == pytest.approx(16 * 0.25, rel=1e-6)


@pytest.mark.parametrize("n1, n2", [(40, 90), (90, 40), (300, 300)])
def test_fid_of_few_points_equals_the_eigenvalue_form(nb, n1, n2):
    # fewer points than dimensions takes the n₁×n₂ route; it must equal the d×d eigenvalue form
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((n1, 128)) * 2 + 1, rng.standard_normal((n2, 128)) @ random_psd(rng, 128)
    gauss = lambda x: (x.astype(np.float32).astype(np.float64).mean(0), np.cov(x.astype(np.float32).astype(np.float64), rowvar=False))
    assert nb.fid_from_features(a, b) == pytest.approx(nb.frechet_distance(*gauss(b), *gauss(a)), rel=1e-7)


def test_inception_score_extremes(nb):
    assert nb.inception_score_from_logits(np.zeros((100, 10)), splits=10) == pytest.approx((1.0, 0.0))
    confident = np.full((1000, 10), -1e4)
    confident[np.arange(1000), np.arange(1000) % 10] = 0       # one-hot, every class equally often
    mean, std = nb.inception_score_from_logits(confident, splits=10)
    assert mean == pytest.approx(10.0, rel=1e-6) and std < 1e-6


def test_kid_is_unbiased_and_detects_shift(nb):
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((400, 32)), rng.standard_normal((400, 32))
    same, _ = nb.kid_from_features(a, b, subsets=50, subset_size=200)
    shifted, _ = nb.kid_from_features(a, b + 1.0, subsets=50, subset_size=200)
    assert abs(same) < 0.01 < shifted


def test_precision_recall_on_constructed_clouds(nb):
    rng = np.random.default_rng(3)
    real = rng.standard_normal((300, 8))
    assert nb.precision_recall(real, real.copy()) == (1.0, 1.0)
    assert nb.precision_recall(real, real + 100.0) == (0.0, 0.0)
    # two far-apart real modes; fakes cover one of them: all plausible (precision 1), half the data (recall ½)
    two_modes = np.concatenate([real[:150], real[150:] + 100.0])
    assert nb.precision_recall(two_modes, real[:150].copy()) == (1.0, 0.5)


def test_density_and_coverage(nb):
    rng = np.random.default_rng(4)
    real = rng.standard_normal((300, 8))
    density, coverage = nb.density_coverage(real, real.copy())
    assert coverage == 1.0 and density >= 1.0
    assert nb.density_coverage(real, real + 100.0) == (0.0, 0.0)


def test_linear_probe_on_separable_latents(nb):
    rng = np.random.default_rng(5)
    y = rng.integers(0, 4, 400)
    z = rng.standard_normal((400, 10)) * 0.1 + np.eye(10)[y] * 3
    accuracy, _ = nb.fit_linear_probe(z[:300], y[:300], z[300:], y[300:])
    assert accuracy > 0.98


def test_the_probe_chooses_its_regularisation_on_held_out_training_features_not_the_test_set(nb):
    """Few images, many noisy dimensions: the held-out split must pick a C (the one scoring best there, ties to the
    stronger), the refit uses every training image, and the test labels never influence the choice."""
    from sklearn.linear_model import LogisticRegression
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 260)
    z = rng.standard_normal((260, 200)) + np.eye(200)[y] * 1.5
    train, test = slice(0, 200), slice(200, 260)
    accuracy, probe = nb.fit_linear_probe(z[train], y[train], z[test], y[test])
    chosen = probe[-1].C
    order = np.random.default_rng(0).permutation(200)
    val, fit = order[:20], order[20:]
    scaled = probe[0].transform(z[train])
    held_out = {c: (LogisticRegression(C=c, max_iter=2000).fit(scaled[fit], y[train][fit]).predict(scaled[val])
                    == y[train][val]).mean() for c in nb.PROBE_C}
    assert chosen in nb.PROBE_C and held_out[chosen] >= max(held_out.values()) - 0.051  # one held-out image
    assert f"C={chosen:g} chosen on a held-out 10% of the training images" in probe.protocol
    assert "refit on all 200 train images" in probe.protocol
    shuffled = nb.fit_linear_probe(z[train], y[train], z[test], rng.permutation(y[test]))[1]
    assert shuffled[-1].C == chosen and accuracy == (probe.predict(z[test]) == y[test]).mean()


def test_class_coverage(nb):
    hist, covered, kl = nb.class_coverage(np.array([0] * 99 + [1]), classes=10)
    assert covered == 2 and hist[0] == pytest.approx(0.99)
    assert kl == pytest.approx(0.99 * np.log(9.9) + 0.01 * np.log(0.1))
    assert nb.class_coverage(np.arange(1000) % 10, classes=10)[2] == pytest.approx(0.0)


def test_active_units_and_psnr(nb):
    mu = np.zeros((100, 5))
    mu[:, 0] = np.random.default_rng(6).standard_normal(100)
    assert nb.active_units(mu) == 1
    assert nb.psnr(0.01) == pytest.approx(20.0)


def test_diversity_zero_for_identical_samples(nb):
    same = np.ones((50, 4))
    assert nb.mean_pairwise_distance(same) == 0.0
    assert nb.mean_pairwise_distance(np.random.default_rng(7).standard_normal((50, 4))) > 1.0


@pytest.mark.parametrize("metric, n, needs", [
    (lambda nb, a, b: nb.fid_from_features(a, b), 1, "FID (needs ≥ 2)"),
    (lambda nb, a, b: nb.kid_from_features(a, b), 3, "KID (needs ≥ 4)"),
    (lambda nb, a, b: nb.precision_recall(a, b), 3, "precision/recall (k=3) (needs ≥ 4)"),
    (lambda nb, a, b: nb.density_coverage(b, a), 5, "density/coverage (k=5) (needs ≥ 6)"),
])
def test_too_few_samples_is_unavailable_not_a_crash(nb, metric, n, needs):
    small, enough = np.random.default_rng(8).standard_normal((n, 4)), np.random.default_rng(9).standard_normal((5, 4))
    with pytest.raises(nb.Unavailable, match=f"N={n} too small for {needs.replace('(', '.').replace(')', '.')}"):
        metric(nb, small, enough)


def test_non_finite_features_and_one_class_are_unavailable(nb):
    feats = np.random.default_rng(10).standard_normal((20, 4))
    bad = feats.copy()
    bad[3, 1] = np.nan
    with pytest.raises(nb.Unavailable, match="non-finite"):
        nb.fit_linear_probe(bad, np.arange(20) % 2, feats, np.arange(20) % 2)
    with pytest.raises(nb.Unavailable, match="one class"):
        nb.fit_linear_probe(feats, np.zeros(20), feats, np.zeros(20))


def test_an_unavailable_value_becomes_an_honest_row(nb):
    row = nb.metric_row("m", "fid", nb.attempt(lambda: nb.fid_from_features(np.zeros((1, 3)), np.zeros((5, 3)))),
                        n=1, note="k=3")
    assert row["value"] is None and row["note"].startswith("unavailable: N=1 too small for FID") and "k=3" in row["note"]


def test_f1_is_the_harmonic_mean_of_precision_and_recall(nb):
    assert nb.f1_score(0.5, 1.0) == pytest.approx(2 / 3)
    assert nb.f1_score(0.2, 0.8) == pytest.approx(0.32)
    assert nb.f1_score(0.0, 0.0) == 0.0
    why = nb.Unavailable("N=3 too small")
    assert nb.f1_score(why, why) is why


def test_gaussian_kl_against_its_closed_form(nb):
    mu = torch.tensor([[0.0, 1.0, -2.0], [0.5, 0.0, 0.0]])
    logvar = torch.tensor([[0.0, 0.0, 0.0], [math.log(4.0), math.log(0.25), 0.0]])
    posterior = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    expected = torch.distributions.kl_divergence(posterior, torch.distributions.Normal(0.0, 1.0)).sum(1)
    assert torch.allclose(nb.kl_to_standard_normal(mu, logvar), expected, atol=1e-6)
    # by hand, second image: ½ Σ (μ² + σ² − 1 − log σ²) = ½ (0.25 + 4 − 1 − log 4 + 0.25 − 1 + log 4)
    assert float(nb.kl_to_standard_normal(mu, logvar)[1]) == pytest.approx(1.25, abs=1e-6)
    assert float(nb.kl_to_standard_normal(mu, logvar)[0]) == pytest.approx(2.5, abs=1e-6)   # ½ (1 + 4)


def test_reparameterised_samples_have_the_posteriors_moments(nb):
    torch.manual_seed(0)
    mu, logvar = torch.full((20000, 2), 3.0), torch.full((20000, 2), math.log(0.25))
    z = nb.reparameterise(mu, logvar)
    assert float(z.mean()) == pytest.approx(3.0, abs=0.01) and float(z.std()) == pytest.approx(0.5, abs=0.01)


REAL_LOGITS, FAKE_LOGITS = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
softplus = lambda x: math.log1p(math.exp(x))


@pytest.mark.parametrize("name, d_expected, g_expected", [
    # −log σ(D(x)) = softplus(−D(x)); −log(1 − σ(D(G(z)))) = softplus(D(G(z)))
    ("bce", (softplus(-2.0) + softplus(1.0)) / 2 + (softplus(0.5) + softplus(-3.0)) / 2,
     (softplus(-0.5) + softplus(3.0)) / 2),
    # hinge: mean(max(0, 1 − [2, −1])) = (0 + 2) / 2; mean(max(0, 1 + [0.5, −3])) = (1.5 + 0) / 2
    ("hinge", 1.0 + 0.75, 1.25),
    # Wasserstein critic: mean D(G(z)) − mean D(x) = −1.25 − 0.5
    ("wgan", -1.75, 1.25),
])
def test_gan_losses_on_known_logits(nb, name, d_expected, g_expected):
    d_loss, g_loss = nb.GAN_LOSSES[name]
    assert float(d_loss(REAL_LOGITS, FAKE_LOGITS)) == pytest.approx(d_expected, rel=1e-6)
    assert float(g_loss(FAKE_LOGITS)) == pytest.approx(g_expected, rel=1e-6)


def test_an_unknown_gan_loss_fails_when_the_model_is_built(nb):
    with pytest.raises(ValueError, match="GAN loss 'hing' is unknown: use one of bce, hinge, wgan"):
        nb.GAN(nn_linear(), nn_linear(), 4, loss="hing")


def nn_linear():
    return torch.nn.Linear(4, 4)


def test_every_table_selects_defined_metrics(nb):
    for table in ("comparison", "report", "compute", "study", "seeds"):
        assert nb.metrics_in(table), table
    assert len({m.label for m in nb.METRICS.values()}) == len(nb.METRICS)  # a label names one metric
    assert all(m.better in ("lower", "higher", "") for m in nb.METRICS.values())
