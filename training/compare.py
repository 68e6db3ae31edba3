"""Trains every architecture of the family on one dataset with one epoch budget and prints a
Markdown table of validation accuracy and training time (docs/training.md's table).

    python -m training.compare --dataset digits --epochs 20 --out runs/compare
"""

import argparse
import logging
import time
from pathlib import Path

from training.models import ARCHITECTURES
from training.train import get_args_parser, main as train


def compare(dataset: str, epochs: int, out: Path, seed: int = 0) -> list:
    rows = []
    for arch in ARCHITECTURES:
        args = get_args_parser().parse_args(["--model", arch, "--dataset", dataset, "--epochs", str(epochs),
                                             "--seed", str(seed), "--out", str(out / arch), "--quiet"])
        started = time.perf_counter()
        best = train(args)
        rows.append({"arch": arch, "best_val_accuracy": best["val_accuracy"], "best_epoch": best["epoch"],
                     "seconds": time.perf_counter() - started})
    return rows


def markdown(rows: list, dataset: str, epochs: int) -> str:
    lines = [f"| model ({dataset}, {epochs} epochs) | best val accuracy | at epoch | training time |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {r['arch']} | {100 * r['best_val_accuracy']:.2f}% | {r['best_epoch']} | {r['seconds']:.0f} s |"
              for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    options = parser.parse_args()
    print(markdown(compare(options.dataset, options.epochs, options.out, options.seed), options.dataset, options.epochs))
