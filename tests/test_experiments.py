"""Experiments and the report: studies as lists of runs in their own folders (resumable, launchable as their own
process), confidence intervals, findings from numbers, REPORT.md whose numbers all come from results files,
TensorBoard mirrors of the histories. A stand-in feature network replaces Inception (no Inception pass here)."""
import csv
import math
import re
import shlex

import pytest
import torch

from conftest import install_fake_inception, make_tiny_data, tiny_settings
from nbmodule import notebook_parameters


def test_experiments_setting_names_studies(nb, settings):
    chosen = lambda **env: nb.selected_studies(settings(**env))
    assert chosen() == ()                      # smoke: none unless asked
    assert chosen(PROFILE="quick", N_TRAIN=5000, BATCH_SIZE=64) == ()   # quick's 30 minutes: the comparison only
    assert chosen(PROFILE="quick", N_TRAIN=5000, BATCH_SIZE=64, EXPERIMENTS="beta,seeds") == ("beta", "seeds")
    assert chosen(PROFILE="full", N_TRAIN=5000, BATCH_SIZE=64) == ()   # full's 30 minutes: studies are opt-in
    assert chosen(PROFILE="quick", N_TRAIN=5000, BATCH_SIZE=64, EXPERIMENTS="none") == ()
    assert chosen(EXPERIMENTS="all") == tuple(nb.STUDIES) == ("beta", "grid", "optimizers", "seeds", "sweep")
    assert chosen(EXPERIMENTS="seeds, beta") == ("seeds", "beta")
    assert chosen(EXPERIMENTS="none") == ()
    with pytest.raises(nb.SettingsError, match="EXPERIMENTS='betas' names unknown studies betas"):
        chosen(EXPERIMENTS="betas")


def test_every_study_has_a_plot_and_every_profile_sizes_only_registered_studies(nb, settings):
    for record in nb.STUDIES.values():
        assert callable(record.runs) and callable(record.plot), record.name
    for name, profile in nb.PROFILES.items():
        assert set(profile.study_sizes) <= set(nb.STUDIES) and set(profile.experiments) <= set(nb.STUDIES), name
        assert all(set(names) <= set(nb.MODEL_REGISTRY) for names in profile.models.values()), name


def test_each_study_is_a_list_of_runs_with_overrides(nb, settings):
    S = settings()
    beta = nb.study_runs("beta", S)
    assert len(beta) == 2 * 2 * 6 and len({r.name for r in beta}) == len(beta)
    assert {dict(r.overrides)["BETA"] for r in beta} == {0.1, 0.25, 0.5, 1.0, 2.0, 4.0}
    assert {dict(r.overrides)["KL_WARMUP"] for r in beta} == {0, 1} and {r.model for r in beta} == {"conv_vae", "sigma_vae"}
    quick = nb.Settings(**{**S.as_dict(), "profile": "quick", "epochs": 0})
    assert [(r.model, dict(r.overrides)["BETA"], dict(r.overrides)["KL_WARMUP"]) for r in nb.study_runs("beta", quick)] \
        == [("conv_vae", b, 0) for b in (0.25, 1.0, 4.0)]  # the CPU-sized subset: conv_vae, 3 βs, no warm-up
    quick_seeds = nb.study_runs("seeds", nb.Settings(**{**quick.as_dict(), "models": ("sn_dcgan", "dcgan", "conv_vae")}))
    assert [(r.model, dict(r.overrides)["SEED"]) for r in quick_seeds] == [("conv_vae", 43), ("dcgan", 43)]
    assert {(r.model, dict(r.overrides)["OPTIMIZER"]) for r in nb.study_runs("optimizers", S)} == \
        {(m, o) for m in ("dcgan", "conv_vae") for o in ("adam", "rmsprop", "sgd")}
    seeds = nb.study_runs("seeds", nb.Settings(**{**S.as_dict(), "models": ("dcgan", "conv_vae")}))
    assert {dict(r.overrides)["SEED"] for r in seeds} == {43, 44} and len(seeds) == 4


def test_a_run_lives_in_its_own_folder_and_its_overrides_are_checked(nb, settings):
    S = settings()
    run = nb.ExperimentRun("beta", "conv_vae-beta4", "conv_vae", (("BETA", 4.0),))
    R = nb.run_settings(S, run)
    folder = nb.Path(S.results_dir) / "experiments" / "beta" / "conv_vae-beta4"
    assert (R.beta, R.models, R.results_dir, R.checkpoint_dir) == (4.0, ("conv_vae",), str(folder), str(folder / "checkpoints"))
    with pytest.raises(ValueError, match="BETA='nan'"):
        nb.run_settings(S, nb.ExperimentRun("beta", "bad", "conv_vae", (("BETA", "nan"),)))


def test_launch_command_resolves_to_the_same_settings(nb, settings):
    S = settings(WIDTH=8, N_TRAIN=128, FID_SAMPLES=24)
    run = nb.ExperimentRun("optimizers", "dcgan-sgd", "dcgan", (("OPTIMIZER", "sgd"),))
    line = nb.launch_command(S, run)
    assert line.endswith(" ./reproduce.sh")
    env = dict(part.split("=", 1) for part in shlex.split(line[:-len(" ./reproduce.sh")]))
    again = nb.resolve_settings(notebook_parameters(), env, cuda_available=False)
    expected = nb.run_settings(S, run)
    assert again.experiments == () and "EXPERIMENTS=none" in line  # the run alone, never the profile's studies
    for key in ("profile", "models", "optimizer", "width", "n_train", "fid_samples", "seed", "batch_size",
                "results_dir", "checkpoint_dir", "beta", "gan_ema", "dataset", "data_seed"):
        assert getattr(again, key) == getattr(expected, key), key


def test_a_seed_run_launched_alone_trains_on_the_main_runs_data(nb, settings):
    S = settings(SEED=42)
    run = next(r for r in nb.study_runs("seeds", nb.Settings(**{**S.as_dict(), "models": ("conv_vae",)})))
    line = nb.launch_command(S, run)
    env = dict(part.split("=", 1) for part in shlex.split(line[:-len(" ./reproduce.sh")]))
    alone = nb.resolve_settings(notebook_parameters(), env, cuda_available=False)
    assert (alone.seed, alone.data_seed) == (43, 42)
    assert nb.load_dataset(alone).key == nb.load_dataset(S).key           # same images, other training seed
    assert nb.load_dataset(settings(SEED=43)).key != nb.load_dataset(S).key  # DATA_SEED follows SEED unless set
    assert "data_seed" in nb.data_identity(alone) and "data_seed" not in nb.data_identity(S)


def test_optimizer_setting_swaps_every_optimizer_and_is_stamped(nb, settings, tiny_data):
    model = nb.build_model("dcgan", settings(OPTIMIZER="rmsprop"), tiny_data)
    assert all(isinstance(o, torch.optim.RMSprop) for o in model.optimizers.values())
    assert model.optimizers["d"].param_groups[0]["lr"] == 2e-4 and model.shaped_by["optimizer"] == "rmsprop"
    assert isinstance(nb.build_model("conv_vae", settings(OPTIMIZER="sgd"), tiny_data).optimizers["vae"], torch.optim.SGD)


def test_a_run_with_the_main_runs_settings_is_the_main_run(nb, settings, tiny_data, monkeypatch):
    S = settings(MODELS="conv_vae")
    same = nb.ExperimentRun("beta", "conv_vae-beta1", "conv_vae", (("BETA", 1.0), ("KL_WARMUP", 0)))
    other = nb.ExperimentRun("beta", "conv_vae-beta4", "conv_vae", (("BETA", 4.0), ("KL_WARMUP", 0)))
    main = {"conv_vae": ("main trained", "main evaluation")}
    assert nb.is_main_run(S, same, main) and not nb.is_main_run(S, other, main)
    assert not nb.is_main_run(S, same, {})  # a model the main run did not train is trained by the study
    monkeypatch.setitem(nb.STUDIES, "beta", nb.Study("beta", lambda S, **sizes: [same], plot=None))
    monkeypatch.setattr(nb, "train_model", lambda *a: pytest.fail("the main run's model was retrained"))
    assert nb.run_study("beta", S, tiny_data, None, main) == [(same, "main trained", "main evaluation")]
    commands = (nb.Path(S.results_dir) / "experiments" / "beta" / "commands.sh").read_text()
    assert "# conv_vae-beta1: the main run's conv_vae" in commands and "reproduce.sh" not in commands


def test_loss_instability_is_scale_free_and_needs_enough_epochs(nb):
    settled = [5.0, 3.0, 2.0, 1.6, 1.5, 1.45, 1.42, 1.41]
    swinging = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert nb.loss_instability(settled) < 0.05 < 0.25 < nb.loss_instability(swinging)
    assert nb.loss_instability([10 * v for v in swinging]) == nb.loss_instability(swinging)
    assert isinstance(nb.loss_instability(swinging[:4]), nb.Unavailable)


def test_confidence_interval_math(nb):
    mean, half, n = nb.confidence_interval([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3) and half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)  # t_{0.975,2} · s/√n
    assert nb.confidence_interval([5.0]) == (5.0, None, 1)
    assert nb.confidence_interval([None, float("nan")]) == (None, None, 0)


def row(model, metric, value, note="", n=None):
    return {"model": model, "metric": metric, "value": value, "spread": None, "n_samples": n, "reference": "",
            "note": note, "weights": "final, epoch 3"}


def test_findings_name_the_metric_and_threshold(nb):
    rows = [row("real data", "recall_test_vs_train", 0.8), row("raw pixels", "probe_accuracy", 0.3),
            row("gan_a", "fid", 30.0, n=1000), row("gan_a", "fid_best", 20.0), row("gan_a", "best_epoch", 2),
            row("gan_a", "classes_covered", 2), row("gan_a", "recall", 0.1),
            row("vae_a", "fid", 90.0, n=1000), row("vae_a", "active_units", 3), row("vae_a", "latent_dim", 64),
            row("vae_a", "probe_accuracy", 0.45), row("vae_a", "classes_covered", 9), row("vae_a", "recall", 0.5),
            row("gan_a", "loss_g_instability", 0.4), row("gan_b", "loss_g_instability", 0.05)]
    seeds = {"seeds": [{"model": "gan_a", "fid": 31.0, "fid_ci95": 2.5, "fid_n": 3}]}
    text = "\n".join(nb.findings(rows, seeds, 10))
    assert "gan_a has the lowest FID, 30 (1000 samples, 31 ± 2.5 over 3 seeds)" in text
    assert "vae_a's encoder gives the best linear probe, 0.45 (raw pixels, same images: 0.3)." in text
    rows[1] = row("raw pixels", "probe_accuracy", 0.5)   # a probe below the pixels is said to fall short of them
    assert ("vae_a's encoder gives the best linear probe, 0.45 — not above the raw-pixel baseline on the same "
            "images, 0.5") in "\n".join(nb.findings(rows, seeds, 10))
    lines = nb.findings(rows, seeds, 10)
    assert "Posterior collapse (active_units; threshold: < 10 % of the latent units active): vae_a 3 of 64." in lines
    assert ("Mode collapse (classes_covered; threshold: ≤ half of the 10 classes, of samples on the data by "
            "precision): gan_a 2.") in lines
    assert "Low diversity (recall; threshold: < 25 % of the real data's 0.8): gan_a 0.1." in lines
    assert "Unstable training (loss_g_instability; threshold: > 0.25): gan_a 0.4." in lines  # not gan_b's 0.05
    assert ("Got worse late (FID at the end vs FID of the best checkpoint; threshold: > 10 % worse): gan_a 30 at "
            "the end vs 20 at epoch 2.") in lines


def test_few_classes_of_samples_off_the_data_is_blur_not_mode_collapse(nb):
    rows = [row("real data", "precision_test_vs_train", 0.8), row("blurry", "classes_covered", 3),
            row("blurry", "precision", 0.03), row("blurry", "class_confidence", 0.9),   # confident, yet blurred
            row("collapsed", "classes_covered", 2), row("collapsed", "precision", 0.7)]
    lines = nb.findings(rows, {}, 10)
    assert ("Mode collapse (classes_covered; threshold: ≤ half of the 10 classes, of samples on the data by "
            "precision): collapsed 2.") in lines
    assert ("Samples off the real data (precision; threshold: < 0.5 × the real test images' 0.8), so few classes "
            "among them is not read as mode collapse: blurry 0.03.") in lines


def test_failure_modes_are_judged_only_at_a_useful_budget(nb):
    rows = [row("gan_a", "classes_covered", 2), row("gan_a", "budget_share", 0.25)]
    assert nb.findings(rows, {}, 10)[-1] == ("No failure-mode findings: every model trained below its profile's "
                                            "budget (budget_share < 1).")
    assert nb.findings(rows[:1], {}, 10, judges=False)[-1].startswith("No failure-mode findings: this profile")
    assert any(line.startswith("Mode collapse") for line in nb.findings(rows[:1], {}, 10))


def test_the_headline_sets_ours_beside_the_reference_projects_expectations(nb):
    rows = [row("conv_vae", "probe_accuracy", 0.47, n=10000), row("dcgan", "fid", 140.0, n=1000)]
    lines = nb.findings(rows, {}, 10, expected=nb.REFERENCE_EXPECTATIONS)
    assert "conv_vae's probe_accuracy is 0.47 (N = 10000); reference project 000 expected 0.45–0.55: inside that " \
           "range." in lines
    assert any(line.startswith("dcgan's fid is 140 (N = 1000)") and line.endswith("outside that range.")
               for line in lines)


@pytest.fixture(scope="module")
def experiment_run(nb, tmp_path_factory):
    # one run shared by the tests below (they read it or reuse its runs); the stand-in Inception for the module
    patch = pytest.MonkeyPatch()
    install_fake_inception(nb, patch)
    tiny_data = make_tiny_data(nb)
    S = tiny_settings(nb, tmp_path_factory.mktemp("experiment"), EPOCHS=2, FID_SAMPLES=32, TRACK_EVERY=1,
                      SAMPLE_EVERY=1, MODELS="dcgan,conv_vae", EXPERIMENTS="optimizers,sweep,seeds",
                      SWEEP="LATENT_DIM=16,32;SEED=42,43")
    reference = nb.build_reference(tiny_data, S)
    trained = {n: nb.train_model(n, S, tiny_data, reference) for n in nb.selected_models(S)}
    evaluations = {n: nb.evaluate_or_reuse(t, tiny_data, reference, S) for n, t in trained.items()}
    sanity = nb.sanity_rows(tiny_data, reference, S)
    studies = {name: nb.run_study(name, S, tiny_data, reference) for name in nb.selected_studies(S)}
    nb.write_report(sanity, evaluations, trained, reference, tiny_data, S, studies)
    yield S, reference
    patch.undo()


def test_a_finished_sweep_is_reused_not_rerun(nb, experiment_run, tiny_data, capsys):
    S, reference = experiment_run
    capsys.readouterr()
    done = nb.run_study("optimizers", S, tiny_data, reference)
    out = capsys.readouterr().out
    assert out.count("not retraining") == 6 and out.count("evaluation reused") == 6 and len(done) == 6
    folder = nb.Path(S.results_dir) / "experiments" / "optimizers"
    assert (folder / "dcgan-sgd" / "checkpoints" / "dcgan" / "last.pt").exists()
    assert len((folder / "commands.sh").read_text().splitlines()) == 7
    table = list(csv.DictReader(open(folder / "table.csv")))
    assert {(r["model"], r["optimizer"]) for r in table} == {(m, o) for m in ("dcgan", "conv_vae")
                                                             for o in ("adam", "rmsprop", "sgd")}
    assert (nb.Path(S.figures_dir) / "study_optimizers.png").exists()


def test_each_study_writes_its_table_and_figure(nb, experiment_run, tiny_data, tmp_path):
    # the optimizer runs (reused, not retrained) stand in for each study's runs under that study's overrides
    S, reference = experiment_run
    done = nb.run_study("optimizers", S, tiny_data, reference)
    S = nb.Settings(**{**S.as_dict(), "results_dir": str(tmp_path / "r"), "figures_dir": str(tmp_path / "f")})
    vae = [(r, t, e) for r, t, e in done if r.model == "conv_vae"]
    as_runs = {
        "beta": [(nb.ExperimentRun("beta", f"b{k}", "conv_vae", (("BETA", b), ("KL_WARMUP", w))), t, e)
                 for k, ((_, t, e), (b, w)) in enumerate(zip(vae, [(0.5, 0), (1.0, 0), (1.0, 1)]))],
        "grid": [(nb.ExperimentRun("grid", f"g{k}", "conv_vae", (("LATENT_DIM", z), ("LR", 1e-3), ("BATCH_SIZE", 64))),
                  t, e) for k, ((_, t, e), z) in enumerate(zip(vae, (64, 128, 256)))],
        "seeds": [(nb.ExperimentRun("seeds", f"s{k}", r.model, (("SEED", 43 + k),)), t, e)
                  for k, (r, t, e) in enumerate(done[:2])],
    }
    main_rows = [row for ev in (e for _, _, e in done[:1]) for row in ev.rows]
    for name, runs in as_runs.items():
        nb.write_study(name, runs, main_rows, S)
        assert (nb.Path(S.figures_dir) / f"study_{name}.png").exists(), name
        table = list(csv.DictReader(open(nb.Path(S.results_dir) / "experiments" / name / "table.csv")))
        assert [r["run"] for r in table] == [r.name for r, _, _ in runs]
    summary = list(csv.DictReader(open(nb.Path(S.results_dir) / "experiments" / "seeds" / "summary.csv")))
    dcgan = next(line for line in summary if line["model"] == "dcgan")
    values = [float(v) for v in dcgan["fid_values"].split()]
    assert dcgan["fid_n"] == "3" and len(values) == 3
    assert float(dcgan["fid"]) == pytest.approx(sum(values) / 3, rel=1e-5)   # mean ± t_{0.975,2} · s/√3
    s = math.sqrt(sum((v - sum(values) / 3) ** 2 for v in values) / 2)
    assert float(dcgan["fid_ci95"]) == pytest.approx(4.302653 * s / math.sqrt(3), rel=1e-4)


NUMBER = r"(?<![\w.])-?\d+(?:\.\d+)?(?:e-?\d+)?(?![\w.])"


def test_every_number_in_the_report_comes_from_a_results_file(nb, experiment_run):
    S, _ = experiment_run
    results = nb.Path(S.results_dir)
    report = (results / "REPORT.md").read_text()
    assert "## Comparison" in report and "## Findings" in report and "study_optimizers.png" in report
    assert "## Compute (cpu)" in report and (results / "compute.csv").exists()
    html = (results / "REPORT.html").read_text()
    assert "<table>" in html and "data:image/png;base64," in html
    known = set()
    for path in list(results.rglob("*.csv")):
        for r in csv.DictReader(open(path)):
            for v in r.values():
                known.add(str(v))
                known.update(re.findall(NUMBER, str(v)))  # numbers quoted inside a text field (notes, protocols)
                try:
                    known.add(nb.fmt(float(v)))
                    known.add(nb.fmt(int(v)))
                except (TypeError, ValueError):
                    pass
    body = report.split("## Comparison", 1)[1].split("## Figures", 1)[0]
    numbers = re.findall(NUMBER, body)
    assert numbers
    missing = [x for x in numbers if x not in known and x not in ("10", "25", "0.25", "1", "2", "3", "0.05")]  # thresholds
    assert not missing, missing


def test_tensorboard_mirrors_the_history(nb, experiment_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    S, _ = experiment_run
    events = EventAccumulator(str(nb.Path(S.results_dir) / "tensorboard" / "dcgan")).Reload()
    assert {"loss_d", "loss_g", "track_kid", "track_fid"} <= set(events.Tags()["scalars"])
    assert "samples" in events.Tags()["images"] and len(events.Scalars("loss_d")) == 2


def test_a_changed_optimizer_against_old_checkpoints_stops_in_the_preflight(nb, settings, tiny_data):
    nb.train_model("dcgan", settings(EPOCHS=1), tiny_data)
    assert nb.checkpoint_errors(settings(EPOCHS=1), ["dcgan"]) == []
    errors = nb.checkpoint_errors(settings(EPOCHS=1, OPTIMIZER="sgd"), ["dcgan"])
    assert len(errors) == 1 and "optimizer 'adam' → 'sgd'" in errors[0] and "CHECKPOINT_DIR" in errors[0]


def test_early_stop_rule_on_a_constructed_curve(nb):
    curve = [10.0, 8.0, 7.0, 7.5, 7.2, 6.95, 7.1, 7.3]
    stops = [e for e in range(1, len(curve) + 1) if nb.early_stop(curve[:e], patience=2, min_delta=0.0)]
    assert stops[0] == 5                                  # epochs 4 and 5 did not beat epoch 3's 7.0
    assert [e for e in range(1, 9) if nb.early_stop(curve[:e], 2, min_delta=0.1)][0] == 5
    assert not any(nb.early_stop(curve[:e], 0) for e in range(1, 9))               # off
    assert [e for e in range(1, 9) if nb.early_stop(curve[:e], 3, min_delta=0.1)][0] == 6  # 6.95 > 7.0 - 0.1


def test_fit_stops_early_and_a_rerun_does_not_train_on(nb, settings, tiny_data, monkeypatch, capsys):
    S = settings(EPOCHS=8, PATIENCE=2)
    losses = iter([5.0, 4.0, 4.5, 4.2, 1.0, 1.0, 1.0, 1.0])
    monkeypatch.setattr(nb.VAE, "heldout_loss", lambda self, x: next(losses))
    history = nb.train_model("conv_vae", S, tiny_data).history
    assert len(history) == 4 and history[-1]["early_stopped"] == 1 and history[-1]["heldout_loss"] == 4.2
    assert "early stop at epoch 4" in capsys.readouterr().out
    again = nb.train_model("conv_vae", S, tiny_data)
    assert len(again.history) == 4 and "stopped early at epoch 4" in capsys.readouterr().out


def test_grid_study_is_reference_003s_parameter_sets_with_its_early_stopping(nb, settings, tiny_data):
    runs = nb.study_runs("grid", settings())
    assert [r.name for r in runs] == [f"{m}-{p}" for m in ("conv_vae", "fc_vae") for p in ("p1", "p2", "p3")]
    sets = {r.name: dict(r.overrides) for r in runs}
    assert [(sets[f"fc_vae-{p}"]["BATCH_SIZE"], sets[f"fc_vae-{p}"]["LR"], sets[f"fc_vae-{p}"]["LATENT_DIM"])
            for p in ("p1", "p2", "p3")] == [(64, 1e-3, 128), (128, 5e-4, 128), (64, 5e-4, 256)]
    assert all((o["PATIENCE"], o["MIN_DELTA"]) == (5, 0.5) and "EPOCHS" not in o for o in sets.values())
    R = nb.run_settings(settings(), runs[-1])
    model = nb.build_model("fc_vae", R, tiny_data)
    assert model.latent_dim == 256 and model.optimizers["vae"].param_groups[0]["lr"] == 5e-4 and R.batch_size == 64
    full = nb.Settings(**{**settings().as_dict(), "profile": "full"})
    assert all(dict(r.overrides)["EPOCHS"] == 60 for r in nb.study_runs("grid", full))  # room to stop early


def test_a_sweep_varies_what_each_model_reads_and_refuses_a_bad_spec_in_one_line(nb, settings):
    S = settings(MODELS="conv_vae,dcgan", SWEEP="LATENT_DIM=16,32")
    runs = nb.study_runs("sweep", S)
    assert [(r.model, r.overrides) for r in runs] == [("conv_vae", (("LATENT_DIM", "16"),)),
                                                      ("conv_vae", (("LATENT_DIM", "32"),))]  # dcgan reads no latent
    assert [nb.run_settings(S, r).latent_dim for r in runs] == [16, 32]
    lr = nb.study_runs("sweep", settings(MODELS="conv_vae,dcgan", SWEEP="lr"))
    assert {(r.model, r.overrides[0][0]) for r in lr} == {("conv_vae", "LR"), ("dcgan", "GAN_LR")} and len(lr) == 8
    assert nb.run_settings(S, lr[-1]).gan_lr == 4e-4
    with pytest.raises(nb.SettingsError, match=r"^SWEEP='NOPE=1': NOPE is not a setting a sweep can vary"):
        settings(SWEEP="NOPE=1")
    with pytest.raises(nb.SettingsError, match=r"^SWEEP: LATENT_DIM='-3' is out of range"):
        settings(SWEEP="LATENT_DIM=-3")
    with pytest.raises(nb.SettingsError, match=r"EXPERIMENTS='sweep' needs SWEEP: set it"):
        nb.selected_studies(settings(EXPERIMENTS="sweep"))


def test_the_sweep_runs_resume_and_reach_the_report(nb, experiment_run, tiny_data, capsys):
    S, reference = experiment_run
    capsys.readouterr()
    done = nb.run_study("sweep", S, tiny_data, reference)   # a killed sweep reruns the same way: finished runs reload
    out = capsys.readouterr().out
    assert len(done) == 6 and out.count("evaluation reused") == 6
    table = list(csv.DictReader(open(nb.Path(S.results_dir) / "experiments" / "sweep" / "table.csv")))
    assert {(r["model"], r["latent_dim"], r["seed"]) for r in table if r["model"] == "conv_vae"} == \
        {("conv_vae", d, s) for d in ("16", "32") for s in ("42", "43")}
    assert (nb.Path(S.figures_dir) / "study_sweep.png").exists()
    report = (nb.Path(S.results_dir) / "REPORT.md").read_text()
    assert "## Reference 001's claims" in report and "## Significance (Welch's t-test" in report
    assert "| Latent size 128 is the best quality/cost trade-off" in report


def test_welch_and_holm_against_scipy_on_fixed_numbers(nb):
    from scipy import stats
    values = {"a": [10.0, 11.0, 12.0, 10.5], "b": [20.0, 21.0, 19.5], "c": [10.2, 11.4, 11.9]}
    lines = nb.welch_table(values, "fid")
    ab = next(t for t in lines if (t["a"], t["b"]) == ("a", "b"))
    t, p = stats.ttest_ind(values["a"], values["b"], equal_var=False)
    assert ab["t"] == pytest.approx(t) and ab["p"] == pytest.approx(p)
    assert nb.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert ab["verdict"] == "a beats b" and ab["p_holm"] == pytest.approx(min(1, 3 * p))   # smallest of three p's
    ac = next(t for t in lines if (t["a"], t["b"]) == ("a", "c"))
    assert ac["verdict"] == "not distinguishable with 4 and 3 seeds"
    higher = nb.welch_table({"a": [0.5, 0.52, 0.51], "b": [0.3, 0.31, 0.29]}, "probe_accuracy")
    assert higher[0]["verdict"] == "a beats b"   # higher is better for the probe


def test_reference_001_claims_get_verdicts_from_the_numbers(nb):
    rows = [{"model": m, "metric": k, "value": v} for m, k, v in [
        ("wgan_gp", "fid", 50.0), ("wgan_gp", "loss_g_instability", 0.3), ("sn_wgan_gp", "fid", 52.0),
        ("sn_wgan_gp", "loss_g_instability", 0.1), ("dcgan", "fid", 45.0), ("dcgan_deep", "fid", 47.0),
        ("conv_vae", "coverage", 0.9), ("dcgan", "coverage", 0.7)]]
    sweep = [{"model": "conv_vae", "latent_dim": str(d), "fid": f} for d, f in ((64, 80.0), (128, 70.0), (256, 69.0))] + \
        [{"model": "dcgan", "gan_lr": str(lr), "fid": f} for lr, f in ((1e-4, 60.0), (2e-4, 55.0))]
    verdicts = {c["claim"].split(" (")[0]: c["verdict"] for c in nb.reference_001_claims(rows, {"sweep": sweep})}
    assert verdicts == {"Learning rate 2e-4 is best for the GANs": "supported",
                        "Learning rate 1e-3 is best for the VAE": "not measured at this budget",
                        "Latent size 128 is the best quality/cost trade-off": "supported",
                        "Spectral normalisation improves stability without hurting quality": "supported",
                        "Deep DCGAN gives the best samples": "contradicted",
                        "The VAE has the best mode coverage": "supported"}
