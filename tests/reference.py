"""The shipped reference run: make it, and verify it from its shipped weights.

    ./reproduce.sh reference [cifar10|mnist ...]   run each reference (quick profile, alone on the machine) into
                                                    results/reference/<name>/ and ship its final weights in
                                                    checkpoints/reference/<name>/ with run.json and checks.json
    ./reproduce.sh verify [--quick] [names]        re-evaluate the shipped weights here and compare every number
                                                    with the shipped metrics.csv (--quick: load, check stamps, sample
                                                    64 images per model and compare them with checks.json; no data)

A user's own run never writes under results/reference/ or checkpoints/reference/.
"""
import argparse
import csv
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from nbmodule import load_notebook, notebook_parameters  # noqa: E402

# name -> the settings of the run; DATA_DIR relative to the repository (stamps name it so, see data_identity)
REFERENCES = {
    "cifar10": {"PROFILE": "quick", "DATASET": "folder", "DATA_DIR": "data/cifar10-jpeg75", "EXPERIMENTS": "none"},
    "mnist": {"PROFILE": "quick", "DATASET": "mnist", "DATA_DIR": "data", "EXPERIMENTS": "none"},
}
DATA_HELP = {"cifar10": "tar xzf cifar10-jpeg75.tar.gz -C data/cifar10-jpeg75 (CIFAR-10, JPEG-75 copy: train/ and "
                        "test/ class folders)", "mnist": "the MNIST IDX files in data/MNIST/raw/"}
# rows a re-evaluation cannot repeat: timings and memory of this machine
TIMINGS = {"train_seconds", "images_per_s", "compile_seconds", "sample_ms_per_1000", "peak_memory_mb", "eval_seconds"}
RELATIVE_TOLERANCE = 1e-3   # beyond float round-off: BLAS thread counts reorder sums; a changed weight moves far more
CHECK_SAMPLES = 64


def folders(name):
    return ROOT / "results" / "reference" / name, ROOT / "checkpoints" / "reference" / name


def settings(nb, name, **extra):
    env = {k: v for k, v in os.environ.items() if k not in nb.RULES}
    return nb.resolve_settings(notebook_parameters(), {**env, **REFERENCES[name], **extra})


def git(*args):
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def sample_fingerprint(model, n=CHECK_SAMPLES, seed=0):
    """sha1 of n samples drawn from a fixed seed, and their mean pixel value: equal only for the same weights."""
    torch.manual_seed(seed)
    with torch.no_grad():
        images = model.sample(n).cpu()
    return hashlib.sha1(images.numpy().tobytes()).hexdigest()[:16], round(float(images.float().mean()), 4)


def shipped_models(name):
    _, weights = folders(name)
    return sorted(p.stem for p in weights.glob("*.pth"))


def load_shipped(nb, name, model_name, S):
    """The shipped final weights of one model, through the notebook's own checks (stamp, epochs, sidecar)."""
    _, weights = folders(name)
    model = nb.build_model(model_name, S, nb.data_shape(S))
    sidecar = json.loads((weights / f"{model_name}.json").read_text())
    stamp = {k: v for k, v in sidecar.get("stamp", {}).items() if k == "data:key"}  # the data itself is not here
    wanted = nb.training_stamp(model_name, model.shaped_by, S, stamp.get("data:key"))
    model, _ = nb.from_final_weights(model, weights / f"{model_name}.pth", wanted, sidecar.get("epochs"))
    return model


def make(name):
    results, weights = folders(name)
    run_checkpoints = ROOT / "checkpoints" / "reference-run" / name   # ignored by git: last.pt with optimizer states
    env = {**os.environ, **REFERENCES[name], "RESULTS_DIR": str(results), "FIGURES_DIR": str(results / "figures"),
           "CHECKPOINT_DIR": str(run_checkpoints)}
    began = time.time()
    out = subprocess.run([str(ROOT / "reproduce.sh")], cwd=ROOT, env=env)
    wall = time.time() - began
    if out.returncode:
        sys.exit(out.returncode)
    nb = load_notebook()
    S = settings(nb, name)
    weights.mkdir(parents=True, exist_ok=True)
    for path in run_checkpoints.glob("*.pth"):
        shutil.copyfile(path, weights / path.name)
        shutil.copyfile(path.with_suffix(".json"), weights / f"{path.stem}.json")
    checks = {m: dict(zip(("sha1", "mean"), sample_fingerprint(load_shipped(nb, name, m, S))))
              for m in shipped_models(name)}
    (weights / "checks.json").write_text(json.dumps({"samples": CHECK_SAMPLES, "seed": 0, "models": checks}, indent=1))
    (results / "run.json").write_text(json.dumps({
        "command": " ".join(f"{k}={v}" for k, v in REFERENCES[name].items()) + " ./reproduce.sh",
        "commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "notebook.ipynb")),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, no GPU"
        if not torch.cuda.is_available() else torch.cuda.get_device_name(), "torch": torch.__version__,
        "wall_seconds": round(wall, 1)}, indent=1))
    print(f"reference {name}: {wall / 60:.1f} min; results in {results}, weights in {weights}")


def read_metrics(path):
    with open(path) as f:
        return {(r["model"], r["metric"]): r for r in csv.DictReader(f)}


def same_number(shipped, now):
    if shipped == now:
        return True
    try:
        a, b = float(shipped), float(now)
    except ValueError:
        return False
    return math.isclose(a, b, rel_tol=RELATIVE_TOLERANCE, abs_tol=1e-9)


def compare(shipped, now):
    """One line per shipped number: 'ok', or 'DIFFERS' / 'MISSING' naming it → (lines, failures)."""
    lines, failures = [], 0
    for key, row in shipped.items():
        if key[1] in TIMINGS:
            continue
        other = now.get(key)
        if other is None:
            verdict = "MISSING"
        elif row["value"] == other["value"] and row["spread"] == other["spread"]:
            verdict = "ok (exact)"
        elif same_number(row["value"], other["value"]) and same_number(row["spread"], other["spread"]):
            verdict = f"ok (within {RELATIVE_TOLERANCE:g} relative)"
        else:
            verdict = "DIFFERS"
        failures += not verdict.startswith("ok")
        lines.append(f"{verdict:<28} {key[0]:<12} {key[1]:<28} shipped {row['value'] or row['note'][:40]!s:<14} "
                     f"now {'' if other is None else other['value'] or other['note'][:40]}")
    return lines, failures


def verify_full(name):
    """STAGE=evaluate on a copy of the shipped weights, with the reference's settings, in a temporary folder."""
    results, weights = folders(name)
    nb = load_notebook()
    S = settings(nb, name)
    if not Path(S.data_dir).exists():
        print(f"error: {name}: no data at {S.data_dir}: {DATA_HELP[name]}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        for path in weights.glob("*.pth"):
            shutil.copyfile(path, Path(tmp) / path.name)
            shutil.copyfile(path.with_suffix(".json"), Path(tmp) / f"{path.stem}.json")
        env = {**os.environ, **REFERENCES[name], "STAGE": "evaluate", "RESULTS_DIR": str(Path(tmp) / "results"),
               "FIGURES_DIR": str(Path(tmp) / "figures"), "CHECKPOINT_DIR": tmp,
               "MODELS": ",".join(shipped_models(name))}
        out = subprocess.run([sys.executable, str(ROOT / "tests" / "nbmodule.py"), "--script"], cwd=ROOT, env=env,
                             capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        lines, failures = compare(read_metrics(results / "metrics.csv"), read_metrics(Path(tmp) / "results" /
                                                                                       "metrics.csv"))
    print("\n".join(lines))
    print(f"{name}: {len(lines) - failures} of {len(lines)} shipped numbers re-computed from the shipped weights"
          + (f"; {failures} DIFFER" if failures else ", all matching"))
    return 1 if failures else 0


def verify_quick(name):
    """No data needed: every shipped weight file loads through the notebook's checks and samples what it did."""
    _, weights = folders(name)
    nb = load_notebook()
    S = settings(nb, name)
    checks = json.loads((weights / "checks.json").read_text())
    failures = 0
    for model_name, want in checks["models"].items():
        try:
            sha1, mean = sample_fingerprint(load_shipped(nb, name, model_name, S), checks["samples"], checks["seed"])
            ok = sha1 == want["sha1"] or math.isclose(mean, want["mean"], abs_tol=1e-3)
            how = "exact" if sha1 == want["sha1"] else f"mean pixel {mean} vs {want['mean']}"
        except (nb.UserError, OSError, ValueError) as err:
            ok, how = False, str(err)
        failures += not ok
        print(f"{'ok' if ok else 'DIFFERS':<8} {name}/{model_name}: {checks['samples']} samples, {how}")
    return failures


def main():
    os.chdir(ROOT)  # stamps name a data folder inside the repository relative to it
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=("make", "verify"))
    parser.add_argument("names", nargs="*", default=list(REFERENCES))
    parser.add_argument("--quick", action="store_true", help="verify: load, check stamps and sample; no data")
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in REFERENCES]
    if unknown:
        sys.exit(f"error: unknown reference {', '.join(unknown)}: use {', '.join(REFERENCES)}")
    if args.action == "make":
        for name in args.names:
            make(name)
        return
    failed = sum((verify_quick if args.quick else verify_full)(name) for name in args.names)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
