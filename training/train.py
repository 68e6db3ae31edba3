"""Trains one of the book's CNNs and writes a checkpoint that `tvserve archive checkpoint` serves.

Examples:
    python -m training.train --model Net --dataset digits --epochs 20 --out runs/digits_net
    python -m training.train --model NetBatchNorm --dataset cifar2 --data-dir data --epochs 100
    python -m training.train --model NetResDeep --dataset imagefolder:photos --augment --epochs 30
    python -m training.train --out runs/digits_net --resume --epochs 40   # carry on to epoch 40

The run folder gets:
    checkpoint.pt   the best epoch by validation accuracy: a plain dict that loads with
                    torch.load(..., weights_only=True) and is all `tvserve archive` needs
    last.pt         the latest epoch with the optimiser and random states, for --resume
    metrics.json    per-epoch train/val loss and accuracy
    curves.png      those curves as a plot
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from training.data import DatasetError, channel_stats, load_dataset, normalise
from training.models import ARCHITECTURES, INPUT_SIZE, build_model

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "tvserve.checkpoint/1"
WIDE_ARCHITECTURES = ("NetWidth", "NetDropout", "NetBatchNorm", "NetDepth", "NetRes", "NetResDeep")


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=add_help
    )
    # Defaults: the book's settings (SGD, lr 1e-2, batch 64) plus momentum, which digits likes.
    parser.add_argument("--model", default="Net", choices=list(ARCHITECTURES))
    parser.add_argument("--n-chans1", type=int, default=32, help="first conv's channels (all but Net)")
    parser.add_argument("--n-blocks", type=int, default=10, help="residual blocks (NetResDeep)")
    parser.add_argument("--dataset", default="digits", help="digits, cifar10, cifar2 or imagefolder:PATH")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="where CIFAR-10 is (or goes)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--l2-mode", choices=["optimizer", "loss"], default="optimizer",
                        help="weight decay in SGD, or the book's explicit L2 penalty added to the loss")
    parser.add_argument("--augment", action="store_true", help="random crop and flip of training images")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="held out (digits, image folders)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed repeats a CPU run exactly")
    parser.add_argument("--out", type=Path, default=Path("runs/digits_net"), help="run folder")
    parser.add_argument("--resume", action="store_true", help="carry on from the run folder's last.pt")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


class ImageTensors(Dataset):
    """uint8 images, normalised per item after optional augmentation (training only)."""

    def __init__(self, images, labels, mean, std, augment=None):
        self.images, self.labels, self.mean, self.std, self.augment = images, labels, mean, std, augment

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image = self.images[index]
        if self.augment is not None:
            image = self.augment(image)
        return normalise(image.unsqueeze(0), self.mean, self.std)[0], self.labels[index]


def augmentation():
    return v2.Compose([v2.RandomCrop(INPUT_SIZE, padding=4, padding_mode="reflect"), v2.RandomHorizontalFlip()])


def l2_penalty(model) -> torch.Tensor:
    """The book's explicit L2 term: the sum of every parameter squared."""
    return sum(p.pow(2.0).sum() for p in model.parameters())


def train_one_epoch(model, loader, optimizer, loss_fn, *, l2_lambda, desc, quiet):
    """One pass over `loader`; returns (mean loss without the penalty, accuracy)."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=quiet):
        logits = model(images)
        loss = loss_fn(logits, labels)
        objective = loss + l2_lambda * l2_penalty(model) if l2_lambda else loss
        optimizer.zero_grad()
        objective.backward()
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


def architecture_args(args, n_classes: int) -> dict:
    arch_args = {"n_classes": n_classes}
    if args.model in WIDE_ARCHITECTURES:
        arch_args["n_chans1"] = args.n_chans1
    if args.model == "NetResDeep":
        arch_args["n_blocks"] = args.n_blocks
    return arch_args


def make_checkpoint(model, *, arch, arch_args, classes, mean, std, dataset, split, epoch, metrics):
    """The checkpoint: plain tensors and values only, so `weights_only=True` loads it.
    `split` ({"val_fraction", "seed"}) lets `tvserve evaluate` rebuild the same validation set."""
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
        "split": split,
        "epoch": epoch,
        "metrics": metrics,
    }


def plot_curves(history: list, path: Path) -> None:
    """Loss and accuracy per epoch, train against validation, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    figure, (loss_axes, acc_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-"), ("val", "--")):
        loss_axes.plot(epochs, [row[f"{split}_loss"] for row in history], style, marker="o", label=split)
        acc_axes.plot(epochs, [100 * row[f"{split}_accuracy"] for row in history], style, marker="o", label=split)
    loss_axes.set(title="cross-entropy loss", xlabel="epoch", ylabel="loss")
    acc_axes.set(title="accuracy", xlabel="epoch", ylabel="%")
    for axes in (loss_axes, acc_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(args):
    torch.manual_seed(args.seed)
    split = load_dataset(args.dataset, data_dir=args.data_dir, val_fraction=args.val_fraction, seed=args.seed)
    mean, std = channel_stats(split.train_images)
    augment = augmentation() if args.augment else None
    train_set = ImageTensors(split.train_images, split.train_labels, mean, std, augment)
    val_set = ImageTensors(split.val_images, split.val_labels, mean, std)
    shuffle = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=shuffle)
    val_loader = DataLoader(val_set, batch_size=256)

    arch_args = architecture_args(args, len(split.classes))
    model = build_model(args.model, **arch_args)
    decay = args.weight_decay if args.l2_mode == "optimizer" else 0.0
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=decay)
    l2_lambda = args.weight_decay if args.l2_mode == "loss" else 0.0
    loss_fn = nn.CrossEntropyLoss()

    args.out.mkdir(parents=True, exist_ok=True)
    history, best, first_epoch = [], None, 1
    if args.resume:
        state = torch.load(args.out / "last.pt", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        shuffle.set_state(state["shuffle_rng"])
        history, best, first_epoch = state["history"], state["best"], state["epoch"] + 1
        log.info("resuming %s from epoch %d", args.out, state["epoch"])
    started = time.perf_counter() - (history[-1]["seconds"] if history else 0.0)
    for epoch in range(first_epoch, args.epochs + 1):
        desc = f"epoch {epoch}/{args.epochs}"
        train_loss, train_acc = train_one_epoch(model, train_loader, optimizer, loss_fn,
                                                l2_lambda=l2_lambda, desc=desc, quiet=args.quiet)
        val_loss, val_acc = evaluate(model, val_loader, loss_fn)
        row = {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc,
               "val_loss": val_loss, "val_accuracy": val_acc, "seconds": time.perf_counter() - started}
        history.append(row)
        log.info("%s: train loss %.4f acc %.4f | val loss %.4f acc %.4f",
                 desc, train_loss, train_acc, val_loss, val_acc)
        if best is None or val_acc > best["val_accuracy"]:
            best = row
            torch.save(make_checkpoint(model, arch=args.model, arch_args=arch_args, classes=split.classes,
                                       mean=mean, std=std, dataset=args.dataset, epoch=epoch, metrics=row,
                                       split={"val_fraction": args.val_fraction, "seed": args.seed}),
                       args.out / "checkpoint.pt")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                    "torch_rng": torch.get_rng_state(), "shuffle_rng": shuffle.get_state(),
                    "history": history, "best": best}, args.out / "last.pt")
    (args.out / "metrics.json").write_text(json.dumps({"best": best, "epochs": history}, indent=2))
    plot_curves(history, args.out / "curves.png")
    log.info("best val accuracy %.4f at epoch %d; checkpoint: %s",
             best["val_accuracy"], best["epoch"], args.out / "checkpoint.pt")
    return best


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        main(get_args_parser().parse_args())
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
