"""Settings validation and the data loaders."""
import subprocess
import sys
from pathlib import Path

import pytest

from nbmodule import notebook_parameters


def resolve(nb, env, cuda=False):
    return nb.resolve_settings(notebook_parameters(), env, cuda_available=cuda)


def test_profile_auto_follows_cuda(nb):
    assert resolve(nb, {}, cuda=False).profile == "quick"
    full = resolve(nb, {}, cuda=True)
    assert (full.profile, full.device, full.fid_samples, full.batch_size) == ("full", "cuda", 50000, 128)


def test_environment_overrides_parameters(nb):
    s = resolve(nb, {"PROFILE": "smoke", "EPOCHS": "3", "MODELS": "dcgan, conv_vae", "SEED": "7", "BETA": "4"})
    assert (s.profile, s.dataset, s.epochs, s.models, s.seed, s.beta) == ("smoke", "synthetic", 3,
                                                                         ("dcgan", "conv_vae"), 7, 4.0)


@pytest.mark.parametrize("env, setting", [
    ({"PROFILE": "fast"}, "PROFILE"),
    ({"EPOCHS": "-1"}, "EPOCHS"),
    ({"EPOCHS": "two"}, "EPOCHS"),
    ({"DATASET": "imagenet"}, "DATASET"),
    ({"DATASET": "folder"}, "DATASET"),
    ({"DATASET": "folder", "DATA_DIR": "/no/such/folder"}, "DATA_DIR"),
    ({"DEVICE": "cuda"}, "DEVICE"),
    ({"GAN_EMA": "1.5"}, "GAN_EMA"),
    ({"FID_SAMPLES": "1"}, "FID_SAMPLES"),
    ({"GAN_EMA": "nan"}, "GAN_EMA"),
    ({"BETA": "nan"}, "BETA"),
    ({"BETA": "inf"}, "BETA"),
    ({"DFC_ALPHA": "-inf"}, "DFC_ALPHA"),
    ({"BATCH_SIZE": "1000", "N_TRAIN": "512"}, "BATCH_SIZE"),
    ({"VAE_SIGMA": "learned"}, "VAE_SIGMA"),
    ({"TRACK_SAMPLES": "1"}, "TRACK_SAMPLES"),
    ({"OPTIMIZER": "lamb"}, "OPTIMIZER"),
    ({"LATENT_DIM": "0"}, "LATENT_DIM"),
    ({"LR": "nan"}, "LR"),
    ({"PATIENCE": "-2"}, "PATIENCE"),
    ({"MIN_DELTA": "inf"}, "MIN_DELTA"),
    ({"DATA_SEED": "-1"}, "DATA_SEED"),
])
def test_bad_settings_name_the_setting(nb, env, setting):
    with pytest.raises(nb.SettingsError) as err:
        resolve(nb, env)
    assert str(err.value).startswith(setting)
    assert ":" in str(err.value) and "\n" not in str(err.value)  # one line: what is wrong, then the fix


def test_all_errors_reported_at_once(nb):
    with pytest.raises(nb.SettingsError) as err:
        resolve(nb, {"PROFILE": "x", "EPOCHS": "0", "BATCH_SIZE": "z"})
    assert len(str(err.value).splitlines()) == 3


def test_folder_without_images_is_rejected(nb, tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "notes.txt").write_text("no images here")
    with pytest.raises(nb.SettingsError, match="DATA_DIR.*holds no images"):
        resolve(nb, {"DATASET": "folder", "DATA_DIR": str(tmp_path)})


def test_unknown_model_name(nb, settings):
    with pytest.raises(nb.SettingsError, match="MODELS has unknown name"):
        nb.selected_models(settings(MODELS="dcgan,stylegan9"))
    with pytest.raises(nb.SettingsError, match="did you mean dcgan"):
        nb.selected_models(settings(MODELS="dcgn"))
    assert nb.selected_models(settings(MODELS="all")) == list(nb.MODEL_REGISTRY)
    assert "mlp_gan" in nb.selected_models(settings(DATASET="mnist"))
    assert "mlp_gan" not in nb.selected_models(settings())
    quick = settings(PROFILE="quick", N_TRAIN=5000, BATCH_SIZE=64)  # quick: the reference pair + the σ-VAE
    assert nb.selected_models(quick) == ["conv_vae", "sigma_vae", "dcgan"]
    assert nb.selected_models(nb.Settings(**{**quick.as_dict(), "dataset": "mnist"})) == ["mlp_vae", "mlp_gan"]
    assert "wgan_gp" in nb.selected_models(settings(PROFILE="quick", N_TRAIN=5000, BATCH_SIZE=64, MODELS="all"))


def preflight_cli(env, cwd=None):
    import os
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, str(Path(__file__).parent / "nbmodule.py"), "--preflight"],
                          env=full, capture_output=True, text=True, cwd=cwd)


def test_preflight_cli_exits_2_with_one_line(tmp_path):
    out = preflight_cli({"PROFILE": "nope"}, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: PROFILE='nope' is unknown: use one of auto, smoke, quick, full, paper"]


def test_preflight_names_an_unknown_study_in_one_line(tmp_path):
    out = preflight_cli({"PROFILE": "smoke", "EXPERIMENTS": "beta,betas", "RESULTS_DIR": str(tmp_path / "r"),
                         "CHECKPOINT_DIR": str(tmp_path / "c"), "FIGURES_DIR": str(tmp_path / "f")}, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: EXPERIMENTS='beta,betas' names unknown studies betas: use none, "
                                               "all or a comma list of beta, grid, optimizers, seeds, sweep"]


def test_preflight_offline_cifar_unwritable_results_and_bad_checkpoint_dir(tmp_path):
    (tmp_path / "a_file").write_text("")
    out = preflight_cli({"PROFILE": "quick", "DATASET": "cifar10", "DATA_DIR": str(tmp_path / "nothing"),
                         "RESULTS_DIR": str(tmp_path / "a_file" / "results"),
                         "CHECKPOINT_DIR": str(tmp_path / "a_file"), "DEVICE": "cpu"}, cwd=tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert any(line.startswith("error: RESULTS_DIR=") and "point RESULTS_DIR at a folder" in line for line in lines)
    assert any(line.startswith("error: CHECKPOINT_DIR=") for line in lines)
    assert any("DATASET=cifar10: not found" in line and "cifar-10-batches-py" in line for line in lines)


def test_misspelt_settings_are_named(nb):
    warnings = nb.misspelt_settings({"PROFIL": "smoke", "MODEL": "dcgan", "HOME": "/root", "PATH": "x"},
                                    list(nb.RULES))
    assert warnings == ["MODEL is not a setting and is ignored: did you mean MODELS?",
                        "PROFIL is not a setting and is ignored: did you mean PROFILE?"]


def test_every_parameter_has_exactly_one_rule(nb):
    assert list(nb.RULES) == list(notebook_parameters())


def test_output_folder_that_is_a_file(nb, settings, tmp_path):
    (tmp_path / "file").write_text("")
    errors = nb.output_folder_errors(settings(CHECKPOINT_DIR=tmp_path / "file"))
    assert len(errors) == 1 and errors[0].startswith("CHECKPOINT_DIR=") and "is a file" in errors[0]


def test_a_second_run_into_the_same_folders_is_refused_and_a_dead_ones_lock_taken_over(nb, settings, tmp_path):
    S = settings()
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time; sys.path.insert(0, {str(Path(__file__).parent)!r})
from nbmodule import load_notebook
nb = load_notebook()
S = nb.Settings(**{S.as_dict()!r})
nb.hold_run_locks(S)
print("locked", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(nb.UserError, match=f"in use by pid {holder.pid}"):
            nb.hold_run_locks(S, wait_seconds=0.2)
    finally:
        holder.kill()
        holder.wait()
    nb.hold_run_locks(S, wait_seconds=5)   # the lock file is still there, but nobody holds it
    nb.release_run_locks()


def test_kernel_exits_when_its_parent_is_killed(tmp_path):
    """exit_with_parent: kill -9 of the parent (reproduce.sh's driver) ends the child (the kernel)."""
    import os
    import signal
    import time
    child = f"""
import os, sys, time; sys.path.insert(0, {str(Path(__file__).parent)!r})
from nbmodule import load_notebook
load_notebook().exit_with_parent(int(sys.argv[1]), poll_seconds=0.1)
print("ready", flush=True)
time.sleep(120)
"""
    parent = subprocess.Popen([sys.executable, "-c", f"""
import os, subprocess, sys, time
p = subprocess.Popen([sys.executable, "-c", {child!r}, str(os.getpid())], start_new_session=True)
print(p.pid, flush=True)
time.sleep(120)
"""], stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    assert parent.stdout.readline().strip() == "ready"   # the child's watchdog is running
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the child outlived its killed parent")


def test_a_new_profile_is_one_record(nb, tmp_path, tiny_data, monkeypatch):
    """A Profile record alone is a valid PROFILE: its name is a choice, budgets default from budget_from."""
    tiny = nb.Profile(dataset="synthetic", n_train=64, n_test=32, batch_size=16, width=4, fid_samples=8,
                      track_every=0, sample_every=0, gan_ema=0.0, track_samples=8, experiments=(), select_by="kid",
                      stage_epochs={"features": 1, "prior": 1}, prior_size=(16, 1))
    monkeypatch.setitem(nb.PROFILES, "tiny", tiny)
    S = nb.resolve_settings(notebook_parameters(), {"PROFILE": "tiny", "DEVICE": "cpu", "RESULTS_DIR": str(tmp_path / "r"),
                                                    "CHECKPOINT_DIR": str(tmp_path / "c")}, cuda_available=False)
    assert (S.profile, S.width) == ("tiny", 4) and "dcgan" in nb.selected_models(S)
    assert nb.budget_text("conv_vae", S, 64) == "20 epochs"   # full's budget, the record's default budget_from
    trained = nb.train_model("dcgan", nb.Settings(**{**S.as_dict(), "epochs": 1}), tiny_data)
    assert len(trained.history) == 1
