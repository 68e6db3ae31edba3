"""Trains one of the book's CNNs and writes a checkpoint that `tvserve archive checkpoint` serves.

Example:
    python -m training.train --model Net --dataset digits --epochs 20 --out runs/digits_net

The run folder gets `checkpoint.pt` (the best epoch by validation accuracy, a plain dict that
loads with `torch.load(..., weights_only=True)`) and `metrics.json` (one row per epoch).
"""

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from training.data import channel_stats, load_dataset, normalise
from training.models import ARCHITECTURES, INPUT_SIZE, build_model

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "tvserve.checkpoint/1"


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=add_help
    )
    # Defaults: the book's settings (SGD, lr 1e-2, batch 64), tuned up only where digits needs it.
    parser.add_argument("--model", default="Net", choices=list(ARCHITECTURES))
    parser.add_argument("--dataset", default="digits", help="digits (offline, bundled scans)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/digits_net"), help="run folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def train_one_epoch(model, loader, optimizer, loss_fn, *, desc, quiet):
    """One pass over `loader`; returns (mean loss, accuracy)."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=quiet):
        logits = model(images)
        loss = loss_fn(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(labels)
        correct += (logits.argmax(dim=1) == labels).sum().item()
        seen += len(labels)
    return total_loss / seen, correct / seen


def evaluate(model, loader, loss_fn):
    """Returns (mean loss, accuracy) of `model` in eval mode over `loader`."""
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    with torch.inference_mode():
        for images, labels in loader:
            logits = model(images)
            total_loss += loss_fn(logits, labels).item() * len(labels)
            correct += (logits.argmax(dim=1) == labels).sum().item()
            seen += len(labels)
    return total_loss / seen, correct / seen


def make_checkpoint(model, *, arch, arch_args, classes, mean, std, dataset, epoch, metrics):
    """The checkpoint: plain tensors and values only, so `weights_only=True` loads it."""
    return {
        "format": CHECKPOINT_FORMAT,
        "arch": arch,
        "arch_args": arch_args,
        "state_dict": model.state_dict(),
        "classes": list(classes),
        "mean": list(mean),
        "std": list(std),
        "input_size": INPUT_SIZE,
        "dataset": dataset,
        "epoch": epoch,
        "metrics": metrics,
    }


def main(args):
    torch.manual_seed(args.seed)
    split = load_dataset(args.dataset, val_fraction=args.val_fraction, seed=args.seed)
    mean, std = channel_stats(split.train_images)
    train_set = TensorDataset(normalise(split.train_images, mean, std), split.train_labels)
    val_set = TensorDataset(normalise(split.val_images, mean, std), split.val_labels)
    shuffle = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=shuffle)
    val_loader = DataLoader(val_set, batch_size=256)

    arch_args = {"n_classes": len(split.classes)}
    model = build_model(args.model, **arch_args)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    loss_fn = nn.CrossEntropyLoss()

    args.out.mkdir(parents=True, exist_ok=True)
    history, best = [], None
    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        desc = f"epoch {epoch}/{args.epochs}"
        train_loss, train_acc = train_one_epoch(
            model, train_loader, optimizer, loss_fn, desc=desc, quiet=args.quiet
        )
        val_loss, val_acc = evaluate(model, val_loader, loss_fn)
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_accuracy": train_acc,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "seconds": time.perf_counter() - started,
        }
        history.append(row)
        log.info("%s: train loss %.4f acc %.4f | val loss %.4f acc %.4f",
                 desc, train_loss, train_acc, val_loss, val_acc)
        if best is None or val_acc > best["val_accuracy"]:
            best = row
            checkpoint = make_checkpoint(
                model, arch=args.model, arch_args=arch_args, classes=split.classes,
                mean=mean, std=std, dataset=args.dataset, epoch=epoch, metrics=row,
            )
            torch.save(checkpoint, args.out / "checkpoint.pt")
    (args.out / "metrics.json").write_text(json.dumps({"best": best, "epochs": history}, indent=2))
    log.info("best val accuracy %.4f at epoch %d; checkpoint: %s",
             best["val_accuracy"], best["epoch"], args.out / "checkpoint.pt")
    return best


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(get_args_parser().parse_args())
