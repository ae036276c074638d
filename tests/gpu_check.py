"""The ten-minute GPU check: one command, one GPU, no Inception network.

    ./reproduce.sh gpu-check [--minutes 10] [--out DIR]

1. Prints the device, torch, CUDA and cuDNN.
2. Benchmarks each flagship model at the `full` profile's width and batch: our engine (one epoch through `fit`)
   against a plain eager loop, and the engine's training step with COMPILE off/on × AMP off/bf16 (images/s).
3. Trains sngan_resnet, dcgan and conv_vae with the `full` settings (STAGE=train: no Inception) for as many
   epochs as the remaining minutes allow, each its share, and writes their weights in parts of at most 16 MiB
   (`tests/nbmodule.py --join` rebuilds them) with the timings, so `./reproduce.sh evaluate` elsewhere gives
   their FIDs. Data: DATASET / DATA_DIR as for a run (default: synthetic images, which say nothing of quality).

Everything goes to OUT (default results/gpu-check): gpu_check.json and the weight parts.
"""
import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from benchmark import plain_epoch, timed  # noqa: E402
from nbmodule import load_notebook, notebook_parameters, split_file  # noqa: E402

FLAGSHIPS = ("sngan_resnet", "dcgan", "conv_vae")


def settings(nb, **overrides):
    env = {"PROFILE": "full", "DATASET": "synthetic", "STAGE": "train", "TRACK_EVERY": "0", "SAMPLE_EVERY": "0",
           "EXPERIMENTS": "none", **{k: v for k, v in os.environ.items() if k in nb.RULES},
           **{k: str(v) for k, v in overrides.items()}}
    return nb.resolve_settings(notebook_parameters(), env)


def images_per_s(nb, S, data, name, steps):
    model = nb.build_model(name, S, data)
    x = data.train_x[:S.batch_size].to(S.device)
    seconds = nb.with_eager_fallback(model, name, lambda: nb.timed_seconds(lambda: model.train_step(x), steps))
    return round(S.batch_size / seconds, 1)


def benchmark(nb, S, data, steps, compiles=("off", "on")):
    rows = []
    x = data.train_x.to(S.device)
    for name in FLAGSHIPS:
        row = {"model": name, "width": S.width, "batch": S.batch_size}
        with tempfile.TemporaryDirectory() as tmp:
            E = nb.Settings(**{**S.as_dict(), "checkpoint_dir": tmp, "results_dir": tmp, "epochs": 1})
            engine = nb.build_model(name, E, data)
            wall, _ = timed(lambda: nb.fit(engine, x, E, name, 1))
        plain = nb.build_model(name, nb.Settings(**{**S.as_dict(), "compile": "off", "amp": "off"}), data)
        plain.train()
        plain_wall, _ = timed(lambda: plain_epoch(name, plain, x, S.batch_size))
        images = len(x) // S.batch_size * S.batch_size
        row.update(engine_epoch_images_per_s=round(images / wall, 1), plain_eager_fp32_images_per_s=round(
            images / plain_wall, 1), engine_over_plain=round(plain_wall / wall, 3))
        for compile_ in compiles:
            for amp in ("off", "bf16"):
                C = nb.Settings(**{**S.as_dict(), "compile": compile_, "amp": amp})
                row[f"step_compile_{compile_}_amp_{amp}_images_per_s"] = images_per_s(nb, C, data, name, steps)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def train(nb, S, data, seconds_left, out):
    """Every flagship for one epoch count (the most the minutes left allow for all three), so one command evaluates
    them elsewhere; each model's final weights go to OUT in parts, with the sidecar evaluation reads."""
    per_epoch = {name: len(data.train_x) / images_per_s(nb, S, data, name, 2) for name in FLAGSHIPS}
    epochs = max(1, int(seconds_left / sum(per_epoch.values())))
    T = nb.Settings(**{**S.as_dict(), "epochs": epochs})
    rows = []
    for name in FLAGSHIPS:
        start = time.perf_counter()
        trained = nb.train_model(name, T, data)
        seconds = round(time.perf_counter() - start, 1)
        weights = Path(T.checkpoint_dir) / f"{name}.pth"
        manifest = split_file(weights, out, part_mb=16)
        shutil.copyfile(weights.with_suffix(".json"), out / f"{name}.json")   # stamp and history: evaluate needs them
        rows.append({"model": name, "epochs": epochs, "train_seconds": seconds,
                     "images_seen": trained.history[-1]["images_seen"], "weights_manifest": manifest.name,
                     "stamp": trained.stamp})
        print(f"trained {name}: {epochs} epochs in {seconds} s → {manifest}", flush=True)
    return rows, epochs


def evaluate_command(nb, out, epochs):
    """The one command that evaluates what this check trained, on another machine with this repository."""
    env = {"PROFILE": "full", "DATASET": "synthetic", "TRACK_EVERY": "0", "SAMPLE_EVERY": "0", "EXPERIMENTS": "none",
           **{k: v for k, v in os.environ.items() if k in nb.RULES and k not in ("STAGE", "DEVICE")},
           "EPOCHS": str(epochs), "MODELS": ",".join(FLAGSHIPS)}
    settings_ = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    return (f"python tests/nbmodule.py --join-all {shlex.quote(str(out))} checkpoints && "
            f"{settings_} ./reproduce.sh evaluate")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10.0, help="the whole check's wall-clock budget")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per benchmark measurement")
    parser.add_argument("--out", default="", help="where gpu_check.json and the weight parts go")
    parser.add_argument("--compile", default="off,on", help="COMPILE values to benchmark (off alone on a CPU test)")
    args = parser.parse_args()
    began = time.perf_counter()
    nb = load_notebook()
    S = settings(nb)
    out = Path(args.out or Path(S.results_dir) / "gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if S.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    about = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
             "cudnn": torch.backends.cudnn.version(), "date": time.strftime("%Y-%m-%d %H:%M"),
             "profile": S.profile, "dataset": S.dataset, "width": S.width, "batch": S.batch_size}
    print(json.dumps(about), flush=True)
    data = nb.load_dataset(S)
    bench = benchmark(nb, S, data, args.steps, tuple(args.compile.split(",")))
    left = args.minutes * 60 - (time.perf_counter() - began) - 30  # 30 s for writing the parts and the summary
    trained, epochs = train(nb, S, data, max(left, 1.0), out)
    command = evaluate_command(nb, out, epochs)
    (out / "gpu_check.json").write_text(json.dumps({**about, "benchmark": bench, "trained": trained, "evaluate": command,
                                                    "wall_seconds": round(time.perf_counter() - began, 1)}, indent=1))
    print(f"written: {out / 'gpu_check.json'} and the weight parts; to evaluate them on any machine:\n{command}")


if __name__ == "__main__":
    main()
