"""Benchmark, not a test: images/s of Inception feature extraction (the evaluation's cost) on this device.

    ./reproduce.sh bench            # or: python tests/benchmark_inception.py [N]
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from nbmodule import load_notebook  # noqa: E402


def main():
    nb = load_notebook()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = int(sys.argv[1]) if len(sys.argv) > 1 else (5000 if device == "cuda" else 200)
    net = nb.inception_net(device)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    net(images[:min(n, 50)])  # warm-up (kernel selection, allocator)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    feats, _ = net(images)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"Inception features: {n} images 32x32 -> {feats.shape[1]}-d in {seconds:.1f}s = {n / seconds:.1f} img/s "
          f"on {name}; pipeline {net.pipeline}")


if __name__ == "__main__":
    main()
