"""Benchmark, not a test: how fast the pipeline is on this device, against plain loops.

    ./reproduce.sh bench              # or: python tests/benchmark.py [--repeats R] [--images N]

1. Training: images/s of the notebook's engine (`fit`, checkpoints and history included) against a plain
   pytorch/examples-style loop written here — the same modules, batch and optimizer settings, none of the
   engine — for dcgan, conv_vae, wgan_gp, sn_dcgan and the largest registered model. Runs alternate
   (engine, plain, plain, engine, ...) so machine noise and warm-up hit both; the ratio is of medians, and CPU
   seconds are reported beside wall-clock seconds.
2. Inception: images/s of our feature pipeline against pytorch-fid's own model called the way its
   `get_activations` does.
3. Metrics: seconds for FID, KID and precision/recall at two feature counts (random 2048-d features).
4. Precision (`--only precision`): what AMP=bf16 changes in a short training trajectory — the same model, initial
   weights, batches and noise trained `--steps` steps in fp32 and under bf16 autocast; reported: how far the
   bf16 weights end from the fp32 ones, relative to how far training moved them, and the mean loss gap.

Everything printed is also written to RESULTS_DIR/benchmark.csv with the device and date.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from nbmodule import load_notebook, notebook_parameters  # noqa: E402


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def plain_gan_epoch(model, x, batch_size, loss, n_critic=1, gp=0.0):
    """pytorch/examples dcgan-style: per batch one D step, and a G step every n_critic batches — with the model's
    own augmentation of real images and fresh generator noise (g_batch × the batch), as the engine does."""
    G, D, opt_g, opt_d = model.generator, model.discriminator, model.optimizers["g"], model.optimizers["d"]
    perm = torch.randperm(len(x), device=x.device)
    for i, start in enumerate(range(0, len(x) - batch_size + 1, batch_size)):
        real = model.augment_real(x[perm[start:start + batch_size]].float() / 127.5 - 1)
        with torch.no_grad():
            fake = G(torch.randn(batch_size, model.latent_dim, device=x.device))
        d_real, d_fake = D(real), D(fake)
        if loss == "bce":
            loss_d = F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real)) + \
                F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
        elif loss == "hinge":
            loss_d = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
        else:
            loss_d = d_fake.mean() - d_real.mean()
        if gp:
            eps = torch.rand(batch_size, 1, 1, 1, device=x.device)
            mixed = (eps * real + (1 - eps) * fake).requires_grad_(True)
            grad, = torch.autograd.grad(D(mixed).sum(), mixed, create_graph=True)
            loss_d = loss_d + gp * (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        if (i + 1) % n_critic == 0:  # fresh noise, g_batch × the batch, as the configurations say
            out = D(G(torch.randn(model.g_batch * batch_size, model.latent_dim, device=x.device)))
            loss_g = F.binary_cross_entropy_with_logits(out, torch.ones_like(out)) if loss == "bce" else -out.mean()
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()


def plain_vae_epoch(model, x, batch_size):
    """pytorch/examples vae-style: encode, reparameterise, decode, reconstruction + KL, step."""
    opt = model.optimizers["vae"]
    perm = torch.randperm(len(x), device=x.device)
    for start in range(0, len(x) - batch_size + 1, batch_size):
        batch = x[perm[start:start + batch_size]]
        mu, logvar = model.encoder(batch.float() / 127.5 - 1).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        recon = torch.sigmoid(model.decoder(z))
        loss = ((recon - batch.float() / 255) ** 2).flatten(1).sum(1).mean() + \
            (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def plain_epoch(name, model, x, batch_size):
    if hasattr(model, "generator"):
        return plain_gan_epoch(model, x, batch_size, model.loss, model.n_critic, model.gp)
    if hasattr(model, "encoder") and hasattr(model, "posterior"):
        return plain_vae_epoch(model, x, batch_size)
    raise SystemExit(f"no plain loop for {name}")


def bench_training(nb, S, data, names, repeats):
    rows = []
    x = data.train_x.to(S.device)
    for name in names:
        engine, plain = [], []
        def run_engine():
            with tempfile.TemporaryDirectory() as tmp:
                S_run = nb.Settings(**{**S.as_dict(), "checkpoint_dir": tmp, "results_dir": tmp})
                model = nb.build_model(name, S_run, data)
                engine.append(timed(lambda: nb.fit(model, x, S_run, name, 1)))

        def run_plain():
            model = nb.build_model(name, nb.Settings(**{**S.as_dict(), "compile": "off"}), data)  # plain = eager
            model.train()
            plain.append(timed(lambda: plain_epoch(name, model, x, S.batch_size)))
        for r in range(repeats):  # interleaved, and the order alternates, so neither side always runs first
            for run in ((run_engine, run_plain) if r % 2 == 0 else (run_plain, run_engine)):
                run()
        images = (len(x) // S.batch_size) * S.batch_size
        e_wall, p_wall = statistics.median(w for w, _ in engine), statistics.median(w for w, _ in plain)
        e_cpu, p_cpu = statistics.median(c for _, c in engine), statistics.median(c for _, c in plain)
        rows.append({"what": f"train {name}", "ours_per_s": round(images / e_wall, 1),
                     "plain_per_s": round(images / p_wall, 1), "ratio": round(p_wall / e_wall, 3),
                     "ratio_cpu_seconds": round(p_cpu / e_cpu, 3), "unit": "images/s",
                     "note": f"{repeats} interleaved pairs (order alternating), {images} images, batch {S.batch_size}, width {S.width}, "
                             f"AMP {S.amp}, COMPILE {S.compile}; engine includes checkpoint + history writes"})
        print_row(rows[-1])
    return rows


def bench_inception(nb, S, n):
    from pytorch_fid.inception import InceptionV3
    from unittest import mock
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ours = nb.inception_net(S.device)
    state, _ = nb.fid_inception_weights()
    full = {**state, **({} if "fc.weight" in state else {"fc.weight": torch.zeros(1008, 2048),
                                                         "fc.bias": torch.zeros(1008)})}
    from pytorch_fid import inception as pf
    with mock.patch.object(pf, "load_state_dict_from_url", lambda *a, **k: full):
        theirs = InceptionV3([3]).eval().to(S.device)
    batch = 250 if S.device == "cuda" else 50

    def pytorch_fid_loop():  # what pytorch-fid's get_activations does per batch
        with torch.no_grad():
            for i in range(0, n, batch):
                theirs(images[i:i + batch].to(S.device).float() / 255)[0].squeeze(3).squeeze(2).cpu()
    ours(images[:batch])
    pytorch_fid_loop() if n <= batch else None
    t_ours, t_theirs = [], []
    for _ in range(2):
        t_ours.append(timed(lambda: ours(images))[0])
        t_theirs.append(timed(pytorch_fid_loop)[0])
    row = {"what": "inception features", "ours_per_s": round(n / min(t_ours), 1),
           "plain_per_s": round(n / min(t_theirs), 1), "ratio": round(min(t_theirs) / min(t_ours), 3),
           "ratio_cpu_seconds": "", "unit": "images/s", "note": f"{n} images 32x32, best of 2; {ours.pipeline}"}
    print_row(row)
    return [row]


def bench_metrics(nb, S, counts):
    rows = []
    for n in counts:
        rng = np.random.default_rng(0)
        real, fake = rng.standard_normal((n, 2048)).astype(np.float32), rng.standard_normal((n, 2048)).astype(np.float32)
        ref = nb.FeatureSet(real, S.device)
        for what, fn in (("reference statistics (mean, cov, sqrt)", lambda: (ref.gaussian(), ref.root())),
                         ("FID vs cached reference", lambda: nb.fid_from_features(fake, ref, S.device)),
                         ("KID (100 subsets of 1000)", lambda: nb.kid_from_features(fake, ref, device=S.device)),
                         ("precision/recall k=3", lambda: nb.precision_recall(ref, fake, device=S.device))):
            seconds = timed(fn)[0]
            rows.append({"what": f"{what} at {n}", "ours_per_s": "", "plain_per_s": "", "ratio": "",
                         "ratio_cpu_seconds": "", "unit": f"{seconds:.2f} s", "note": "random 2048-d features"})
            print_row(rows[-1])
    return rows


def print_row(row):
    ratio = f"  ratio {row['ratio']} (CPU-seconds ratio {row['ratio_cpu_seconds']})" if row["ratio"] != "" else ""
    speeds = f"ours {row['ours_per_s']} vs plain {row['plain_per_s']} {row['unit']}" if row["ours_per_s"] != "" \
        else row["unit"]
    print(f"{row['what']:48s} {speeds}{ratio}", flush=True)


def bench_precision(nb, S, data, names, steps):
    """bf16 autocast against fp32 over `steps` training steps from the same state (see the module text)."""
    rows, x = [], data.train_x[:steps * S.batch_size].to(S.device)
    for name in names:
        runs = {}
        for amp in (False, True):
            model = nb.build_model(name, S, data)
            model.amp = amp
            start = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
            torch.manual_seed(1)
            losses = [{k: float(v) for k, v in model.train_step(x[i * S.batch_size:(i + 1) * S.batch_size]).items()}
                      for i in range(steps)]
            runs[amp] = model, start, losses
        fp32, start, loss32 = runs[False]
        bf16, _, loss16 = runs[True]
        moved = sum((v.float() - start[k]).pow(2).sum() for k, v in fp32.state_dict().items() if k in start).sqrt()
        apart = sum((v.float() - bf16.state_dict()[k].float()).pow(2).sum()
                    for k, v in fp32.state_dict().items() if k in start).sqrt()
        key = "loss_d" if "loss_d" in loss32[0] else "loss"
        gap = statistics.mean(abs(a[key] - b[key]) / max(1e-8, abs(a[key])) for a, b in zip(loss32, loss16))
        rows.append({"section": "precision", "name": name, "steps": steps, "bf16_apart_over_moved": float(apart / moved),
                     f"mean_relative_{key}_gap": gap})
        print(f"precision {name:14s} after {steps} steps: bf16 weights are {float(apart / moved):.3f} × the fp32 "
              f"run's distance travelled apart from fp32; mean relative {key} gap {gap:.4f}")
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=0, help="training images (default 4096 CPU / 16384 CUDA)")
    parser.add_argument("--skip", default="", help="comma list of sections to skip: training, inception, metrics")
    parser.add_argument("--only", default="", help="run only this section: training, inception, metrics, precision")
    parser.add_argument("--steps", type=int, default=50, help="training steps of the precision section")
    args = parser.parse_args()
    nb = load_notebook()
    import os
    env = {"PROFILE": "quick", "DATASET": "synthetic", **os.environ}
    S = nb.resolve_settings(notebook_parameters(), env)
    cuda = S.device == "cuda"
    n = args.images or (16384 if cuda else 4096)  # an epoch long enough that its checkpoint write is amortised as in a run
    S = nb.Settings(**{**S.as_dict(), "n_train": n, "track_every": 0, "sample_every": 0})
    x, y = nb.synthetic_images(n, S.seed)
    data = nb.Dataset("synthetic", torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(x[:64]),
                      torch.from_numpy(y[:64]), key="bench", classes=nb.synthetic_class_names())
    device = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"benchmark on {device}, {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, "
          f"width {S.width}, batch {S.batch_size}, AMP {S.amp}, COMPILE {S.compile} (the plain loop is always eager)")
    torch.manual_seed(0)
    sizes = {name: sum(p.numel() for p in nb.build_model(name, S, data).parameters())
             for name in nb.MODEL_REGISTRY if nb.MODEL_REGISTRY[name].family == "image"}
    largest = max((n for n in sizes if n in ("conv_vae", "fc_vae", "resnet_vae") or "gan" in n), key=sizes.get)
    names = list(dict.fromkeys(["dcgan", "conv_vae", "wgan_gp", "sn_dcgan", largest]))
    sections = ("training", "inception", "metrics", "precision")
    skip = set(sections) - {args.only} if args.only else set(args.skip.split(",")) | {"precision"}
    rows = []
    if "training" not in skip:
        rows += bench_training(nb, S, data, names, args.repeats)
    if "inception" not in skip:
        rows += bench_inception(nb, S, 2000 if cuda else 100)
    if "metrics" not in skip:
        rows += bench_metrics(nb, S, (10000, 50000) if cuda else (2000, 10000))
    if "precision" not in skip:
        rows += bench_precision(nb, S, data, names, args.steps)
    for row in rows:
        row.update(device=device, date=time.strftime("%Y-%m-%d"))
    nb.write_csv(Path(S.results_dir) / "benchmark.csv", rows)
    print(f"written: {Path(S.results_dir) / 'benchmark.csv'}")


if __name__ == "__main__":
    main()
