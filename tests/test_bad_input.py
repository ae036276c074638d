"""The next round of bad input and faults: each ends as a clean run or one line naming the fix."""
import errno
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import install_fake_inception
from nbmodule import without_warnings
from test_notebook_e2e import reproduce

REPO = Path(__file__).resolve().parent.parent


def test_a_kill_during_a_stage_models_second_epoch_resumes_to_identical_numbers(nb, settings, tiny_data, tmp_path,
                                                                                 monkeypatch):
    whole = nb.train_model("dfc_vae", settings(EPOCHS=2, CHECKPOINT_DIR=tmp_path / "a", RESULTS_DIR=tmp_path / "ra"),
                           tiny_data)
    S = settings(EPOCHS=2, CHECKPOINT_DIR=tmp_path / "b", RESULTS_DIR=tmp_path / "rb")
    real_callback = nb.epoch_callback

    def killing(name, S_, stamp, reference=None):
        def on_epoch_end(model, epoch):
            if name == "dfc_vae" and epoch == 2:
                raise KeyboardInterrupt  # killed during epoch 2: the checkpoint of epoch 1 is the last
            return real_callback(name, S_, stamp, reference)(model, epoch)
        return on_epoch_end
    monkeypatch.setattr(nb, "epoch_callback", killing)
    with pytest.raises(KeyboardInterrupt):
        nb.train_model("dfc_vae", S, tiny_data)
    monkeypatch.setattr(nb, "epoch_callback", real_callback)
    resumed = nb.train_model("dfc_vae", S, tiny_data)   # a new process would do the same: stage reloaded, resume
    keys = ("loss", "recon", "kl")
    assert [[row[k] for k in keys] for row in resumed.history] == [[row[k] for k in keys] for row in whole.history]


def planted_link(tmp_path, folder, name):
    """A file outside the run's folders and a link to it planted as folder/name: (the outside file)."""
    outside = tmp_path / f"outside-{name}"
    outside.write_text("keep me")
    (tmp_path / folder).mkdir(exist_ok=True)
    os.symlink(outside, tmp_path / folder / name)
    return outside


def test_links_planted_in_the_output_folders_are_refused_never_written_through(nb, settings, tmp_path):
    S = settings()
    outside = planted_link(tmp_path, "results", "run.log")
    errors = nb.output_folder_errors(S)
    assert len(errors) == 1 and errors[0].startswith("RESULTS_DIR: ") and "run.log is a symbolic link" in errors[0]
    nb.atomic_write(tmp_path / "results" / "run.log", lambda tmp: open(tmp, "w").write("new"))
    assert outside.read_text() == "keep me" and not (tmp_path / "results" / "run.log").is_symlink()


def test_a_lock_file_that_is_a_link_is_never_followed(nb, settings, tmp_path):
    S = settings()
    outside = planted_link(tmp_path, "checkpoints", ".run.lock")
    with pytest.raises(OSError):
        nb.hold_run_locks(S)
    nb.release_run_locks()
    assert outside.read_text() == "keep me"


def test_an_unreadable_cache_entry_is_a_miss(nb, tmp_path, capsys):
    path = tmp_path / "entry.npz"
    np.savez(path, x=np.arange(3))
    path.write_bytes(path.read_bytes()[:20])  # truncated
    assert nb.read_cache(path, lambda z: z["x"]) is None
    assert "is unreadable (BadZipFile); recomputing it" in capsys.readouterr().out
    assert nb.read_cache(tmp_path / "none.npz", lambda z: z["x"]) is None


def test_a_full_disk_is_one_line_naming_the_file(nb, tmp_path):
    def full(tmp):
        open(tmp, "w").write("partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(nb.UserError, match="no space left on the disk of .* while writing metrics.csv: free space"):
        nb.atomic_write(tmp_path / "metrics.csv", full)
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind, nothing damaged


@pytest.mark.parametrize("env, message", [
    ({"SEED": "99999999999999999999"}, "SEED='99999999999999999999' is out of range: set SEED to an integer ≥ 0 and "
                                       "below 2147483648"),
    ({"MODELS": ",,"}, "MODELS=',,' names nothing"),
    ({"EXPERIMENTS": " , "}, "EXPERIMENTS=' , ' names nothing"),
    ({"TRACK_SAMPLES": "500", "FID_SAMPLES": "64"}, "TRACK_SAMPLES=500 is more than FID_SAMPLES=64"),
])
def test_bad_values_are_refused_by_the_settings_check(nb, settings, env, message):
    with pytest.raises(nb.SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        settings(**env)


def test_tracking_never_uses_more_samples_than_the_evaluation(nb, settings):
    S = settings(PROFILE="full", N_TRAIN=512, FID_SAMPLES=64, TRACK_EVERY=10)
    assert S.track_samples == 64  # the profile's 10,000, capped


def test_a_training_set_far_above_the_profiles_is_said(nb, settings):
    lines = nb.small_count_warnings(settings(N_TRAIN=100000))
    assert len(lines) == 1 and lines[0].startswith("N_TRAIN=100000 is 195× the smoke profile's 512")


def test_class_names_the_font_cannot_draw_get_a_fallback_label(nb):
    assert nb.drawable_labels(["cat", "猫"]) == ["cat", "class 1: \\u732b"]


def test_third_party_warnings_go_to_the_log_not_the_terminal():
    state = {}
    text = ("epoch 1\n/site/torch/serialization.py:1: UserWarning: pickle protocol 4\n  state = load(f)\n"
            "/site/matplotlib/text.py:2: UserWarning: Glyph 29483 missing from font(s) DejaVu Sans.\n  fig.draw()\n")
    assert without_warnings(text, state) == "epoch 1\n"


def test_links_out_of_data_dir_are_followed_and_named(nb, tmp_path, capsys):
    from PIL import Image
    for folder in ("data/train/cat", "elsewhere/dog"):
        (tmp_path / folder).mkdir(parents=True)
        Image.new("RGB", (8, 8), "red").save(tmp_path / folder / "a.png")
    os.symlink(tmp_path / "elsewhere" / "dog", tmp_path / "data" / "train" / "dog")
    (train_x, train_y), _, classes = nb.read_folder(tmp_path / "data")
    assert classes == ("cat", "dog") and len(train_x) == 2
    assert "followed 1 symbolic link(s) to folders outside it: dog → " in capsys.readouterr().out


@pytest.mark.parametrize("where", ["sampling", "step n_critic"])
def test_a_compile_failure_anywhere_falls_back_to_eager_with_one_line(nb, settings, tiny_data, capsys, where):
    S = settings(COMPILE="on", BATCH_SIZE=8)   # 8 batches: the generator's first step is batch 5 (n_critic)
    model = nb.build_model("wgan_gp", S, tiny_data)
    calls = {"n": 0}

    def broken_on_generator_update(*args, **kwargs):
        calls["n"] += 1
        if where == "sampling" or calls["n"] > model.n_critic:   # the generator's own step, or any sampling call
            raise RuntimeError("inductor: recompile failed")
        return model.generator._call_impl(*args, **kwargs)  # the eager forward
    model.generator._compiled_call_impl = broken_on_generator_update
    if where == "sampling":
        images = model.sample(4)
        assert images.shape == (4, 3, 32, 32)
    else:
        history = nb.fit(model, tiny_data.train_x, S, "wgan_gp", 1)
        assert len(history) == 1 and "loss_g" in history[0]
        d_steps = {int(state["step"]) for state in model.optimizers["d"].state.values()}
        assert d_steps == {len(tiny_data.train_x) // 8}   # the retried step did not update the critic twice
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("COMPILE:")]
    assert len(lines) == 1 and "inductor: recompile failed" in lines[0] and model.compiled == []
    assert lines[0].startswith("COMPILE: torch.compile failed for wgan_gp ")   # named as MODELS= names it


@pytest.mark.parametrize("name", ["conv_vae", "dcgan"])
def test_a_training_step_makes_no_host_transfer(nb, settings, tiny_data, monkeypatch, name):
    model = nb.build_model(name, settings(GAN_EMA="0.9"), tiny_data)
    model.train_step(tiny_data.train_x[:16])  # warm-up (lazy init)
    transfers = []

    def ours():  # called from the notebook's own code (torch's optimizers keep their step counts on the host)
        return sys._getframe(2).f_code.co_filename.startswith("notebook.ipynb")
    for method in ("item", "tolist", "numpy", "__float__", "__bool__", "__int__", "cpu"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method, lambda self, *a, _o=original, _m=method, **k:
                            (transfers.append(_m) if ours() else None) or _o(self, *a, **k))
    real_tensor = torch.Tensor.new_tensor
    monkeypatch.setattr(torch.Tensor, "new_tensor", lambda self, *a, **k:
                        (transfers.append("new_tensor") if ours() else None) or real_tensor(self, *a, **k))
    for _ in range(2):
        model.train_step(tiny_data.train_x[:16])
    assert transfers == []


def test_parameters_count_what_trains_not_the_ema_copy(nb, settings, tiny_data, monkeypatch):
    install_fake_inception(nb, monkeypatch)
    S = settings(GAN_EMA="0.9", EPOCHS=1, FID_SAMPLES=16)
    trained = nb.train_model("dcgan", S, tiny_data)
    rows = {r["metric"]: r for r in nb.evaluate_model(trained, tiny_data, nb.build_reference(tiny_data, S), S).rows}
    g, d = (sum(p.numel() for p in net.parameters()) for net in (trained.model.generator, trained.model.discriminator))
    assert rows["parameters"]["value"] == g + d and f"generator {g:,}" in rows["parameters"]["note"]


def test_compile_time_is_apart_from_the_steady_speed(nb, settings, tiny_data, monkeypatch):
    S = settings(BATCH_SIZE=8)
    model = nb.build_model("wgan_gp", S, tiny_data)   # n_critic 5: the warm-up is the first 5 steps
    clock, real_step = [0.0], model.train_step

    def step_of_one_second(x):   # a fake clock: every step takes 1 s, the first 10 s more (a compile)
        clock[0] += 11.0 if clock[0] == 0 else 1.0
        return real_step(x)
    monkeypatch.setattr(model, "train_step", step_of_one_second)
    monkeypatch.setattr(nb.time, "perf_counter", lambda: clock[0])
    row, = nb.fit(model, tiny_data.train_x, S, "wgan_gp", 1)
    steps = len(tiny_data.train_x) // 8
    assert row["seconds"] == steps + 10 and row["compile_s"] == 10.0 and row["steady_images_per_s"] == 8.0
    rows, _ = nb.training_facts(types.SimpleNamespace(history=[row], name="wgan_gp", model=model,
                                                      peak_memory_mb=1.0, S=S, data=tiny_data))
    facts = {r["metric"]: r["value"] for r in rows}
    assert facts["compile_seconds"] == 10.0 and facts["images_per_s"] == 8.0


@pytest.mark.parametrize("env", [{"GAN_EMA": "0.99999999"}, {"KL_WARMUP": "50"}, {"TRACK_EVERY": "50"},
                                 {"TRACK_SAMPLES": "2", "TRACK_EVERY": "1"}, {"OPTIMIZER": "sgd"}])
def test_untried_settings_run_to_the_end(nb, settings, tiny_data, monkeypatch, env):
    install_fake_inception(nb, monkeypatch)
    S = settings(EPOCHS=1, FID_SAMPLES=16, **env)
    reference = nb.build_reference(tiny_data, S)
    for name in ("dcgan", "conv_vae"):
        trained = nb.train_model(name, S, tiny_data, reference)
        assert len(trained.history) == 1 and not trained.diverged
        assert any(r["metric"] == "fid" for r in nb.evaluate_model(trained, tiny_data, reference, S).rows)


def test_an_unwritable_results_folder_is_one_line(nb, settings, monkeypatch):
    S = settings()
    real_write = nb.Path.write_text

    def refuse(self, *a, **k):
        if ".write-test-" in self.name and self.parent.name == "results":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_write(self, *a, **k)
    monkeypatch.setattr(nb.Path, "write_text", refuse)
    errors = nb.output_folder_errors(S)
    assert len(errors) == 1 and "RESULTS_DIR=" in errors[0] and "cannot be written (PermissionError)" in errors[0]


def test_a_replaced_image_with_an_older_date_changes_the_pixels_and_the_data_key(nb, settings, tmp_path):
    """Data identity by content: what tar -x, cp -p and rsync -t leave (new bytes, an old modification time)."""
    from PIL import Image
    for k, colour in enumerate(("red", "green", "blue", "white")):
        (tmp_path / "data" / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), colour).save(tmp_path / "data" / f"c{k % 2}" / f"{k}.png")
    S = settings(DATASET="folder", DATA_DIR=tmp_path / "data", CACHE_DIR=tmp_path / "cache", N_TRAIN="", BATCH_SIZE=1)
    before = nb.load_dataset(S)
    target = tmp_path / "data" / "c0" / "0.png"
    old = target.stat().st_mtime - 3600
    Image.new("RGB", (8, 8), "black").save(target)
    os.utime(target, (old, old))
    after = nb.load_dataset(S)
    assert after.key != before.key and not torch.equal(torch.cat([after.train_x, after.test_x]).sort(0).values,
                                                       torch.cat([before.train_x, before.test_x]).sort(0).values)


def test_a_read_only_cache_folder_costs_the_cache_not_the_run(nb, settings, tmp_path, capsys):
    from PIL import Image
    (tmp_path / "data" / "a").mkdir(parents=True)
    for k in range(3):
        Image.new("RGB", (8, 8), (k, 0, 0)).save(tmp_path / "data" / "a" / f"{k}.png")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "folders").write_text("a file where the cache's folder should be")
    S = settings(DATASET="folder", DATA_DIR=tmp_path / "data", CACHE_DIR=tmp_path / "cache", N_TRAIN="", BATCH_SIZE=1)
    data = nb.load_dataset(S)
    assert len(data.train_x) + len(data.test_x) == 3
    assert "decoded images not cached (set CACHE_DIR to a writable folder)" in capsys.readouterr().out


def test_a_full_disk_at_the_runners_own_writes_is_one_line_each(tmp_path, monkeypatch):
    import nbformat
    import nbmodule
    log = nbmodule.RunLog(nbmodule.Path("/dev/full"))      # every write: ENOSPC
    log.write("epoch 1\n" * 1000)
    assert log.close().startswith("/dev/full could not be written (No space left on device): free space there")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(nbformat, "write", full)
    message = nbmodule.save_executed(nbformat.v4.new_notebook(), tmp_path)
    assert "notebook.executed.ipynb could not be written (No space left on device)" in message
    assert list(tmp_path.iterdir()) == []


def image_folder(root, n=6, classes=2):
    from PIL import Image
    for k in range(n):
        (root / f"c{k % classes}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (40 * k, 0, 0)).save(root / f"c{k % classes}" / f"{k}.png")
    return root


def test_output_folders_inside_the_data_folder_are_refused_before_any_work(nb, settings, tmp_path):
    data = image_folder(tmp_path / "data")
    S = settings(DATASET="folder", DATA_DIR=data, N_TRAIN="", BATCH_SIZE=2, FIGURES_DIR=data / "figures")
    with pytest.raises(nb.UserError, match=r"^FIGURES_DIR='.*figures' and DATA_DIR=.* lie one inside the other: .* "
                                           r"point FIGURES_DIR outside DATA_DIR$"):
        nb.preflight(S)


def test_relative_folders_resolve_where_the_command_was_typed(tmp_path):
    image_folder(tmp_path / "images")
    env = {**os.environ, "PYTHON": sys.executable, "PROFILE": "smoke", "DEVICE": "cpu", "BATCH_SIZE": "2",
           "DATASET": "folder", "DATA_DIR": "images", "RESULTS_DIR": "out/results", "CHECKPOINT_DIR": "out/ck",
           "FIGURES_DIR": "out/figures", "CACHE_DIR": "out/cache"}
    out = subprocess.run([str(REPO / "reproduce.sh"), "check"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out" / "results").is_dir() and not (REPO / "out").exists()


def test_settings_a_selected_model_cannot_train_with_are_refused_up_front(nb, settings):
    with pytest.raises(nb.UserError, match=r"BATCH_SIZE=1: mlp_gan batch-normalises, which needs at least 2"):
        nb.preflight(settings(MODELS="mlp_gan", BATCH_SIZE=1))
    with pytest.raises(nb.SettingsError, match=r"LATENT_DIM='100000' is out of range"):
        settings(LATENT_DIM=100000)


def test_a_batch_larger_than_a_folders_images_is_refused_in_the_preflight(nb, settings, tmp_path):
    data = image_folder(tmp_path / "data", n=10)
    with pytest.raises(nb.UserError, match=r"^BATCH_SIZE=16 is larger than the 9 training images in DATA_DIR"):
        nb.preflight(settings(DATASET="folder", DATA_DIR=data, N_TRAIN=""))


def test_an_under_trained_checkpoint_is_refused_in_the_preflight_at_stage_evaluate(nb, settings, tiny_data):
    nb.train_model("conv_vae", settings(EPOCHS=1), tiny_data)
    with pytest.raises(nb.UserError, match=r"^STAGE=evaluate: .*conv_vae holds 1 of the 2 epochs this run asks for"):
        nb.preflight(settings(EPOCHS=2, STAGE="evaluate", MODELS="conv_vae"))


def test_checkpoint_claims_are_checked_against_what_they_can_be(nb, settings, tiny_data):
    S = settings(EPOCHS=1)
    trained = nb.train_model("conv_vae", S, tiny_data)
    nb.save_best(nb.Path(S.checkpoint_dir) / "conv_vae", trained.model, 99, "track_kid", 0.5, trained.stamp)
    ctx = types.SimpleNamespace(S=S, name="conv_vae", history=trained.history, stamp=trained.stamp,
                                model=trained.model, rows=[])
    with pytest.raises(nb.UserError, match=r"best.pt claims epoch 99 .* of a model trained 1 epochs: delete it"):
        nb.best_checkpoint_rows(ctx)


def test_a_mixture_fit_that_cannot_run_is_an_unavailable_row(nb, settings, tiny_data, monkeypatch):
    import sklearn.mixture
    S = settings(EPOCHS=1)
    trained = nb.train_model("conv_vae", S, tiny_data)

    def no_memory(self, x):
        raise MemoryError
    monkeypatch.setattr(sklearn.mixture.GaussianMixture, "fit", no_memory)
    rows, _ = nb.latent_rows(types.SimpleNamespace(S=S, name="conv_vae", model=trained.model, data=tiny_data))
    gmm = {r["metric"]: r for r in rows if r["metric"].endswith("_gmm")}
    assert set(gmm) == {"fid_gmm", "kid_gmm"} and all(r["value"] is None for r in gmm.values())
    assert "unavailable: the mixture fit failed (MemoryError)" in gmm["fid_gmm"]["note"]


def test_training_facts_come_from_the_trainings_own_history(nb, settings, tiny_data):
    """A model trained elsewhere (another device, precision, compile mode) is reported with its training's facts."""
    S = settings(EPOCHS=1)
    trained = nb.train_model("conv_vae", S, tiny_data)
    assert trained.history[-1]["trained_with"] == "cpu, AMP off, COMPILE off"
    history = [{**row, "trained_with": "cuda, AMP bf16, COMPILE on", "peak_memory_mb": 1234.5} for row in trained.history]
    rows, _ = nb.training_facts(types.SimpleNamespace(history=history, name="conv_vae", model=trained.model, S=S,
                                                      data=tiny_data))
    facts = {r["metric"]: r["value"] for r in rows}
    assert facts["trained_with"] == "cuda, AMP bf16, COMPILE on" and facts["peak_memory_mb"] == 1234.5
    old = [{k: v for k, v in row.items() if k not in ("trained_with", "peak_memory_mb")} for row in trained.history]
    rows, _ = nb.training_facts(types.SimpleNamespace(history=old, name="conv_vae", model=trained.model, S=S,
                                                      data=tiny_data))
    assert {r["metric"]: r["note"] for r in rows}["peak_memory_mb"].startswith("unavailable: not in its training history")


def test_out_of_gpu_memory_mid_run_is_one_line_naming_the_model_and_the_setting(nb, settings, tiny_data, monkeypatch):
    S = settings(EPOCHS=2)
    nb.train_model("conv_vae", nb.Settings(**{**S.as_dict(), "epochs": 1}), tiny_data)   # one epoch finished
    real_fit = nb.fit

    def out_of_memory(model, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(nb, "fit", out_of_memory)
    with pytest.raises(nb.UserError, match=r"^conv_vae ran out of GPU memory at BATCH_SIZE=16: lower BATCH_SIZE"):
        nb.train_model("conv_vae", S, tiny_data)
    monkeypatch.setattr(nb, "fit", real_fit)
    assert len(nb.train_model("conv_vae", S, tiny_data).history) == 2   # resumed from the kept epoch


def test_a_split_run_says_why_it_has_no_best_checkpoint_rows(nb, settings, tiny_data):
    S = settings(EPOCHS=1, TRACK_EVERY=1)
    trained = nb.train_model("dcgan", nb.Settings(**{**S.as_dict(), "stage": "train"}), tiny_data)  # no reference
    rows, _ = nb.best_checkpoint_rows(types.SimpleNamespace(S=S, name="dcgan", history=trained.history,
                                                            stamp=trained.stamp, model=trained.model, rows=[]))
    assert [r["metric"] for r in rows] == ["best_epoch", "fid_best", "kid_best"]
    assert all(r["value"] is None and "unavailable: its training tracked nothing" in r["note"] for r in rows)


def test_poisoned_checkpoint_ends_in_one_line_without_a_traceback(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))
    (tmp_path / "checkpoints" / "dcgan").mkdir(parents=True)
    torch.save({"evil": Payload()}, tmp_path / "checkpoints" / "dcgan" / "last.pt")
    code, out, err = reproduce(tmp_path, MODELS="dcgan")
    assert code == 2 and "Traceback" not in err and "code ran" not in out
    assert err.strip().splitlines()[-1].startswith("error: checkpoint checkpoints/dcgan/last.pt holds objects other "
                                                   "than tensors")
    assert "Traceback" in (tmp_path / "results" / "run.log").read_text()   # kept for whoever debugs
