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


def folders(name, root=ROOT):
    """(shipped results, shipped weights) of one reference run."""
    return root / "results" / "reference" / name, root / "checkpoints" / "reference" / name


def settings(nb, name, **extra):
    """The reference's settings; without its data here (a clean clone, CI), resolved as if synthetic and then named
    as the reference's data again: stamps and network shapes need the names, not the images."""
    env = {**{k: v for k, v in os.environ.items() if k not in nb.RULES}, **REFERENCES[name], **extra}
    if Path(env["DATA_DIR"]).exists():
        return nb.resolve_settings(notebook_parameters(), env)
    S = nb.resolve_settings(notebook_parameters(), {**env, "DATASET": "synthetic", "DATA_DIR": ""})
    return nb.Settings(**{**S.as_dict(), "dataset": env["DATASET"], "data_dir": env["DATA_DIR"]})


def git(*args):
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def sample_fingerprint(model, n=CHECK_SAMPLES, seed=0):
    """sha1 of n samples drawn from a fixed seed, and their mean pixel value: equal only for the same weights."""
    torch.manual_seed(seed)
    with torch.no_grad():
        images = model.sample(n).cpu()
    return hashlib.sha1(images.numpy().tobytes()).hexdigest()[:16], round(float(images.float().mean()), 4)


def shipped_models(name, root=ROOT):
    _, weights = folders(name, root)
    return sorted(p.stem for p in weights.glob("*.pth"))


def load_shipped(nb, name, model_name, S, root=ROOT):
    """The shipped final weights of one model, through the notebook's own checks (stamp, epochs, sidecar)."""
    _, weights = folders(name, root)
    model = nb.build_model(model_name, S, nb.data_shape(S))
    sidecar = json.loads((weights / f"{model_name}.json").read_text())
    stamp = {k: v for k, v in sidecar.get("stamp", {}).items() if k == "data:key"}  # the data itself is not here
    wanted = nb.training_stamp(model_name, model.shaped_by, S, stamp.get("data:key"))
    model, _ = nb.from_final_weights(model, weights / f"{model_name}.pth", wanted, sidecar.get("epochs"))
    return model


def copy_weights(source, target):
    """Every final-weights file of source (those with a sidecar: not the deliverables' copies) into target."""
    Path(target).mkdir(parents=True, exist_ok=True)
    for sidecar in Path(source).glob("*.json"):
        shutil.copyfile(sidecar.with_suffix(".pth"), Path(target) / f"{sidecar.stem}.pth")
        shutil.copyfile(sidecar, Path(target) / sidecar.name)


def file_sha1(path):
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()[:16]


def write_checks(nb, name, root=ROOT):
    """checks.json: per shipped weight file, its hash and the fingerprint of what it samples with this code."""
    _, weights = folders(name, root)
    S = settings(nb, name)
    checks = {}
    for m in shipped_models(name, root):
        sha1, mean = sample_fingerprint(load_shipped(nb, name, m, S, root))
        checks[m] = {"weights_sha1": file_sha1(weights / f"{m}.pth"), "samples_sha1": sha1, "mean": mean}
    (weights / "checks.json").write_text(json.dumps({"samples": CHECK_SAMPLES, "seed": 0, "models": checks}, indent=1))


def make(name):
    results, _ = folders(name)
    run_checkpoints = ROOT / "checkpoints" / "reference-run" / name   # ignored by git: last.pt with optimizer states
    env = {**os.environ, **REFERENCES[name], "RESULTS_DIR": str(results), "FIGURES_DIR": str(results / "figures"),
           "CHECKPOINT_DIR": str(run_checkpoints)}
    began = time.time()
    out = subprocess.run([str(ROOT / "reproduce.sh")], cwd=ROOT, env=env)
    wall = time.time() - began
    if out.returncode:
        sys.exit(out.returncode)
    ship(name, wall)


def ship(name, wall_seconds):
    """The finished run's final weights (each with its sidecar) into checkpoints/reference/<name>/, checks.json,
    run.json and the folders' READMEs."""
    results, weights = folders(name)
    run_checkpoints = ROOT / "checkpoints" / "reference-run" / name
    copy_weights(run_checkpoints, weights)
    write_checks(load_notebook(), name)
    (results / "run.json").write_text(json.dumps({
        "command": " ".join(f"{k}={v}" for k, v in REFERENCES[name].items()) + " ./reproduce.sh",
        "commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "notebook.ipynb")),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, no GPU"
        if not torch.cuda.is_available() else torch.cuda.get_device_name(), "torch": torch.__version__,
        "wall_seconds": round(wall_seconds, 1)}, indent=1))
    for path, text in readmes().items():
        path.write_text(text)
    print(f"reference {name}: {wall_seconds / 60:.1f} min; results in {results}, weights in {weights}")


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
    if not Path(REFERENCES[name]["DATA_DIR"]).exists():
        print(f"error: {name}: no data at {REFERENCES[name]['DATA_DIR']}: {DATA_HELP[name]}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        copy_weights(weights, tmp)
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


def verify_quick(name, root=ROOT, nb=None):
    """No data needed: every shipped weight file loads through the notebook's checks and samples what it did."""
    _, weights = folders(name, root)
    nb = nb or load_notebook()
    S = settings(nb, name)
    checks = json.loads((weights / "checks.json").read_text())
    failures = 0
    if sorted(checks["models"]) != shipped_models(name, root) or not checks["models"]:
        print(f"DIFFERS  {name}: checks.json covers {sorted(checks['models'])}, the folder holds "
              f"{shipped_models(name, root)}")
        failures += 1
    for model_name, want in checks["models"].items():
        try:
            changed = file_sha1(weights / f"{model_name}.pth") != want["weights_sha1"]
            model = load_shipped(nb, name, model_name, S, root)
            sha1, mean = sample_fingerprint(model, checks["samples"], checks["seed"])
            same = sha1 == want["samples_sha1"] or math.isclose(mean, want["mean"], abs_tol=1e-3)
            ok = same and not changed
            how = ("the weights file changed since it was shipped; " if changed else "") + (
                "samples identical" if sha1 == want["samples_sha1"] else f"mean pixel {mean} vs {want['mean']}")
        except (nb.UserError, OSError, ValueError, KeyError) as err:
            ok, how = False, str(err)
        failures += not ok
        print(f"{'ok' if ok else 'DIFFERS':<8} {name}/{model_name}: {checks['samples']} samples, {how}")
    return failures


LABELS = {"cifar10": "CIFAR-10 (JPEG-75 copy)", "mnist": "MNIST"}


def cell(row, digits=3):
    if row is None or row["value"] == "":
        return "—"
    value = float(row["value"])
    return f"{value:.{digits}f}" if abs(value) < 10 else f"{value:.1f}"


def expectation(nb, model, values):
    """(reference 000's expected range for this model's metric and where ours falls, whether ours falls short)."""
    if model not in nb.REFERENCE_EXPECTATIONS:
        return "", False
    metric, low, high, who = nb.REFERENCE_EXPECTATIONS[model]
    label = nb.METRICS[metric].label
    caveat = f" ({who.split('(', 1)[1]}" if "(" in who else ""
    ours = values.get((model, metric))
    if ours is None or ours["value"] == "":
        return f"{label} {low:g}–{high:g}{caveat}: not measured", False
    value = float(ours["value"])
    where = "within" if low <= value <= high else ("below" if value < low else "above")
    short = (where, nb.METRICS[metric].better) in (("below", "higher"), ("above", "lower"))
    return f"{label} {low:g}–{high:g}{caveat}: {where}" + (" — **falls short**" if short else ""), short


def results_table(root=ROOT, nb=None):
    """The README's results table, from the shipped metrics.csv of every reference run, and the shortfalls."""
    nb = nb or load_notebook()
    lines = ["| data | model | weights | FID | KID | precision | recall | probe μ / hidden | reference 000 expected |",
             "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for name in REFERENCES:
        results, _ = folders(name, root)
        if not (results / "metrics.csv").exists():
            continue
        values = read_metrics(results / "metrics.csv")
        models = [m for m in dict.fromkeys(k[0] for k in values) if m in nb.MODEL_REGISTRY]
        pixels = values.get(("raw pixels", "probe_accuracy"))
        for model in models + ["raw pixels", "real data"]:
            get = lambda metric: values.get((model, metric))
            fid = get("fid") or get("fid_train_vs_test")
            probe = cell(get("probe_accuracy")) + (f" / {cell(get('probe_accuracy_hidden'))}"
                                                   if get("probe_accuracy_hidden") else "")
            weights = (fid or get("probe_accuracy") or {}).get("weights", "").split(" (")[0] if model in models \
                else ("floor: real test images" if model == "real data" else "probe baseline")
            expected, short = expectation(nb, model, values)
            lines.append(f"| {LABELS[name]} | {model} | {weights} | {cell(fid, 1) if fid else '—'} | "
                         f"{cell(get('kid') or get('kid_train_vs_test'), 4)} | "
                         f"{cell(get('precision') or get('precision_test_vs_train'))} | "
                         f"{cell(get('recall') or get('recall_test_vs_train'))} | {probe} | {expected} |")
            if short:
                notes.append(f"Falls short: {LABELS[name]} {model}'s {expected.split(':')[0]} expectation.")
            mine = get("probe_accuracy")
            if model in models and mine and pixels and mine["value"] and float(mine["value"]) <= float(pixels["value"]):
                notes.append(f"Falls short: {LABELS[name]} {model}'s probe on μ, {cell(mine)}, is not above raw "
                             f"pixels on the same images, {cell(pixels)}.")
        fid = next(r for (m, k), r in values.items() if k == "fid" and m in models)
        protocol = pixels["note"].split("; ", 1)[-1].split(" chosen", 1)[-1] if pixels else ""
        notes.append(f"{LABELS[name]}: FID/KID/precision/recall from {fid['n_samples']} samples against "
                     f"{fid['reference']}; probes: logistic regression, standardised, C chosen per probe{protocol} "
                     f"(raw pixels too), scored on {pixels['n_samples'] if pixels else '?'} test images.")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def provenance_lines(root=ROOT):
    lines = []
    for name in REFERENCES:
        results, _ = folders(name, root)
        if (results / "run.json").exists():
            run = json.loads((results / "run.json").read_text())
            lines.append(f"- **{name}** ({LABELS[name]}): `{run['command']}` at commit `{run['commit']}`"
                         + (" (notebook edited after that commit)" if run.get("dirty") else "")
                         + f", {run['date']}, {run['machine']}, torch {run['torch']}, {run['wall_seconds'] / 60:.1f} min "
                         "wall clock, alone on the machine.")
    return lines


def readmes(root=ROOT):
    """{path: text} of results/reference/README.md and checkpoints/reference/README.md, from the runs' run.json."""
    made = "\n".join(provenance_lines(root))
    results = f"""# results/reference/ — the shipped reference run (a user's run never writes here)

The `quick` profile's run on the CPU, made by the code of this repository and shipped so its numbers can be read
without running anything and re-checked from the shipped weights (`./reproduce.sh verify`). Made by
`./reproduce.sh reference` (see `tests/reference.py`):

{made}

Each `<name>/` is what that run wrote to its `RESULTS_DIR` (layout: `results/README.md`), less the TensorBoard
event files and the evaluation caches: `REPORT.md` / `REPORT.html` (the one-page report), `metrics.csv` (every
number, with its sample count, reference set, profile, device and weights), `comparison`, `compute`, `fid.txt`,
`linear_probe.csv`, `vae_recons.png`, `gan_samples.png`, `figures/` (curves and the report's figures),
`<model>/` (history, samples), `notebook.executed.ipynb` (the notebook with its outputs), `run.log` and
`run.json` (command, commit, date, machine, wall clock). Code changed after the commit named above is checked
against these numbers by `./reproduce.sh verify`; the one change to the report since then is wording: a best probe
that is not above raw pixels is now said to be so (the README's table says it too).
"""
    weights = f"""# checkpoints/reference/ — the reference run's final weights (a user's run never writes here)

`<name>/<model>.pth`: final weights (a plain state dict, loaded with `weights_only=True`), `<model>.json`: the
sidecar the notebook checks before using them (the training stamp: every setting that shaped the model and the
data's fingerprint; the epochs; the training history), `checks.json`: each file's hash and the fingerprint of
{CHECK_SAMPLES} images it samples from seed 0 with this code. `./reproduce.sh verify --quick` (in the test suite)
loads every file through those checks and compares; `./reproduce.sh verify` re-evaluates them on the data and
compares every number with `results/reference/<name>/metrics.csv`. Made by:

{made}
"""
    return {root / "results" / "reference" / "README.md": results,
            root / "checkpoints" / "reference" / "README.md": weights}


def main():
    os.chdir(ROOT)  # stamps name a data folder inside the repository relative to it
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=("make", "ship", "verify", "table", "checks", "docs"))
    parser.add_argument("names", nargs="*", default=list(REFERENCES))
    parser.add_argument("--quick", action="store_true", help="verify: load, check stamps and sample; no data")
    parser.add_argument("--wall-seconds", type=float, help="ship: the finished run's wall clock")
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in REFERENCES]
    if unknown:
        sys.exit(f"error: unknown reference {', '.join(unknown)}: use {', '.join(REFERENCES)}")
    if args.action == "checks":
        nb = load_notebook()
        for name in args.names:
            write_checks(nb, name)
        return
    if args.action == "docs":
        for path, text in readmes().items():
            path.write_text(text)
        return
    if args.action == "table":
        print(results_table(), end="")
        return
    if args.action == "ship":   # a run made by make that stopped after the notebook finished
        for name in args.names:
            ship(name, args.wall_seconds)
        return
    if args.action == "make":
        for name in args.names:
            make(name)
        return
    failed = sum((verify_quick if args.quick else verify_full)(name) for name in args.names)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
