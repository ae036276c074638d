"""The shipped reference run: its weights load through the notebook's checks and sample what they sampled when
shipped, an altered or unloadable weight file is caught, and the README's results table is the shipped numbers."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import reference

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def at_the_repository(monkeypatch):
    monkeypatch.chdir(ROOT)   # stamps name data folders inside the checkout relative to it


def copied(tmp_path, name):
    for folder in reference.folders(name):
        target = tmp_path / folder.relative_to(ROOT)
        shutil.copytree(folder, target)
    return tmp_path


@pytest.mark.parametrize("name", list(reference.REFERENCES))
def test_every_shipped_weight_file_loads_and_samples_what_it_did_when_shipped(nb, name, capsys):
    assert reference.shipped_models(name), f"no shipped weights in {reference.folders(name)[1]}"
    assert reference.verify_quick(name, nb=nb) == 0, capsys.readouterr().out
    run = json.loads((reference.folders(name)[0] / "run.json").read_text())
    assert {"command", "commit", "date", "machine", "torch", "wall_seconds"} <= set(run)


def test_an_altered_weight_file_is_caught(nb, tmp_path, capsys):
    root = copied(tmp_path, "cifar10")
    weights = reference.folders("cifar10", root)[1] / "dcgan.pth"
    state = torch.load(weights, weights_only=True)
    key = next(k for k, v in state.items() if v.is_floating_point() and v.dim() == 4)
    state[key] = state[key] * 1.5
    torch.save(state, weights)
    assert reference.verify_quick("cifar10", root, nb=nb) == 1
    out = capsys.readouterr().out
    assert "DIFFERS  cifar10/dcgan" in out and "ok       cifar10/conv_vae" in out


def test_an_unloadable_or_missing_weight_file_is_caught(nb, tmp_path, capsys):
    root = copied(tmp_path, "mnist")
    folder = reference.folders("mnist", root)[1]
    first, second = sorted(folder.glob("*.pth"))[:2]
    first.write_bytes(first.read_bytes()[:100])
    second.unlink()
    assert reference.verify_quick("mnist", root, nb=nb) == 2 + 1   # two models, and the list of files
    out = capsys.readouterr().out
    assert f"DIFFERS  mnist/{first.stem}" in out and f"DIFFERS  mnist/{second.stem}" in out


def test_the_full_comparison_names_every_differing_number():
    row = {"value": "118.7", "spread": "", "note": ""}
    shipped = {("dcgan", "fid"): row, ("dcgan", "kid"): {**row, "value": "0.0724"},
               ("dcgan", "train_seconds"): {**row, "value": "608"}, ("real data", "fid_train_vs_test"): row}
    now = {("dcgan", "fid"): {**row, "value": "118.70001"}, ("dcgan", "kid"): {**row, "value": "0.0810"},
           ("dcgan", "train_seconds"): {**row, "value": "1"}}
    lines, failures = reference.compare(shipped, now)
    assert failures == 2 and len(lines) == 3                                   # timings are this machine's
    assert lines[0].startswith("ok (within") and lines[1].startswith("DIFFERS") and "kid" in lines[1]
    assert lines[2].startswith("MISSING") and "fid_train_vs_test" in lines[2]


def test_the_readme_results_table_is_the_shipped_metrics(nb):
    table = reference.results_table(nb=nb)
    assert "| CIFAR-10 (JPEG-75 copy) | dcgan |" in table and "| MNIST | mlp_vae |" in table
    assert table in (ROOT / "README.md").read_text(), \
        "README's results table is stale: paste `python tests/reference.py table`"


def test_each_reference_folder_says_which_command_commit_machine_and_date_made_it():
    for path, text in reference.readmes().items():
        assert path.read_text() == text, f"{path} is stale: python tests/reference.py docs"
        for name in reference.REFERENCES:
            run = json.loads((reference.folders(name)[0] / "run.json").read_text())
            assert run["command"] in text and run["commit"] in text and run["date"] in text
