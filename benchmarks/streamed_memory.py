"""Peak memory of a streamed search: a LoaderTask over an ImageFolder of PNGs, at several dataset sizes.

For every size the script writes that many 64x64 PNGs (three classes) into a temporary folder, then runs,
in a fresh process, ``autoprune.search`` with the random agent over DataLoaders of that folder (worker
processes, batch 32) and reports the process's peak resident memory (``ru_maxrss``, the search process
itself; the loader's worker processes are apart). A streamed search reads images batch by batch, so the
peak must not grow with the number of images. Run:

    .venv/bin/python benchmarks/streamed_memory.py [--sizes 2000,20000] [--trials 4] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch
from torch import nn
from torch.utils.data import DataLoader
import torchvision
from torchvision import transforms
import autoprune

root, val_root, trials, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
train = torchvision.datasets.ImageFolder(root, transform=transforms.Compose([transforms.RandomHorizontalFlip(),
                                                                              transforms.ToTensor()]))
val = torchvision.datasets.ImageFolder(val_root, transform=transforms.ToTensor())
task = autoprune.LoaderTask.classification(DataLoader(train, batch_size=32, shuffle=True, num_workers=2),
                                           DataLoader(val, batch_size=100, num_workers=2))
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                      nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 3)).eval()
t0 = time.perf_counter()
result = autoprune.search(model, task, {"flops": "50%"}, agent="random", trials=trials, finetune_steps=steps,
                          device="cpu")
print(json.dumps({"images": len(train), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.perf_counter() - t0, "trials": len(result.study.trials)}))
"""


def write_pngs(root: Path, n: int, size: int = 64) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        c = i % 3
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(rng.normal(60 + 70 * c, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2000,20000", help="dataset sizes, comma separated")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20, help="fine-tune steps per candidate")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        val_root = Path(tmp) / "val"
        write_pngs(val_root, 300)
        for n in (int(s) for s in args.sizes.split(",")):
            root = Path(tmp) / f"train{n}"
            t0 = time.perf_counter()
            write_pngs(root, n)
            wrote = time.perf_counter() - t0
            out = subprocess.run([sys.executable, "-c", CHILD, str(root), str(val_root), str(args.trials),
                                  str(args.steps)], capture_output=True, text=True, check=True)
            rows.append({**json.loads(out.stdout.strip().splitlines()[-1]), "write_seconds": wrote})
    base = rows[0]["peak_rss_mb"]
    print("| images | peak RSS of the search process (MB) | ratio to the smallest | search s | trials |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['images']} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / base:.3f} | {r['seconds']:.1f} | "
              f"{r['trials']} |")


if __name__ == "__main__":
    from _cli import run

    run(main)
