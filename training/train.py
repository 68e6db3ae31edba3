"""Trains one of the book's CNNs and writes a checkpoint that `tvserve archive checkpoint` serves.

Examples:
    python -m training.train --model Net --dataset digits --augment digits --epochs 40 --out runs/digits_net
    python -m training.train --model NetBatchNorm --dataset cifar2 --data-dir data --epochs 100
    python -m training.train --model NetResDeep --dataset imagefolder:photos --augment --epochs 30
    python -m training.train --model NetBatchNorm --resume --epochs 40   # carry on to epoch 40

The run folder (--out, by default runs/MODEL-DATASET, e.g. runs/NetBatchNorm-digits) gets:
    checkpoint.pt   the best epoch by validation accuracy: a plain dict that loads with
                    torch.load(..., weights_only=True) and is all `tvserve archive` needs
    last.pt         the latest epoch with the optimiser and random states, for --resume
    metrics.json    per-epoch train/val loss and accuracy
    curves.png      those curves as a plot

--lr and --momentum default to the architecture's recipe (RECIPES). A run whose training loss
stops being finite, or whose best validation accuracy is no better than always answering the
most common class, fails with one line saying what to change and keeps no checkpoint.pt.
"""

import argparse
import json
import logging
import math
import re
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from training.augment import AUGMENTATIONS, augmentation
from training.data import channel_stats, load_dataset, normalise
from training.errors import TrainingError
from training.models import ARCHITECTURES, INPUT_SIZE, build_model

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "tvserve.checkpoint/1"
WIDE_ARCHITECTURES = ("NetWidth", "NetDropout", "NetBatchNorm", "NetDepth", "NetRes", "NetResDeep")

# Each architecture's optimiser defaults; flags given on the command line win. SGD with momentum
# 0.9 at lr 1e-2 trains the shallow nets well on digits, CIFAR and image folders. NetResDeep's ten
# un-normalised residual sums make that step too big (it sits at chance or swings): the book
# trains it at lr 3e-3.
RECIPES = {
    "Net": {"lr": 1e-2, "momentum": 0.9},
    "NetWidth": {"lr": 1e-2, "momentum": 0.9},
    "NetDropout": {"lr": 1e-2, "momentum": 0.9},
    "NetBatchNorm": {"lr": 1e-2, "momentum": 0.9},
    "NetDepth": {"lr": 1e-2, "momentum": 0.9},
    "NetRes": {"lr": 1e-2, "momentum": 0.9},
    "NetResDeep": {"lr": 3e-3, "momentum": 0.9},
}


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=add_help
    )
    # Defaults: the book's SGD at batch 64; --lr and --momentum left out come from RECIPES.
    parser.add_argument("--model", default="Net", choices=list(ARCHITECTURES))
    parser.add_argument("--n-chans1", type=int, default=32, help="first conv's channels (all but Net)")
    parser.add_argument("--n-blocks", type=int, default=10, help="residual blocks (NetResDeep)")
    parser.add_argument("--dataset", default="digits", help="digits, cifar10, cifar2 or imagefolder:PATH")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="where CIFAR-10 is (or goes)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, help="SGD learning rate (default: the architecture's recipe)")
    parser.add_argument("--momentum", type=float, help="SGD momentum (default: the architecture's recipe)")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--l2-mode", choices=["optimizer", "loss"], default="optimizer",
                        help="weight decay in SGD, or the book's explicit L2 penalty added to the loss")
    parser.add_argument("--augment", nargs="?", const="photo", choices=list(AUGMENTATIONS),
                        help="training augmentation: photo (random crop and flip; --augment alone) or digits "
                             "(polarity, stroke width, rotation, shift and scale of handwriting)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="held out (digits, image folders)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed repeats a CPU run exactly")
    parser.add_argument("--out", type=Path, help="run folder (default: runs/MODEL-DATASET)")
    parser.add_argument("--resume", action="store_true", help="carry on from the run folder's last.pt")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


class Batches:
    """DataLoader's collate_fn: stacks (uint8 image, label) items, augments the batch (training
    only) and normalises it. Returns (float32 Tensor[N, 3, H, W], int64 Tensor[N])."""

    def __init__(self, mean, std, augment=None):
        self.mean, self.std, self.augment = mean, std, augment

    def __call__(self, items):
        images = torch.stack([image for image, _ in items])
        labels = torch.stack([label for _, label in items])
        if self.augment is not None:
            images = self.augment(images)
        return normalise(images, self.mean, self.std), labels


def fill_defaults(args):
    """Completes parsed `args` in place: lr and momentum from the architecture's recipe, and the
    run folder from the model and dataset. Returns `args`."""
    for key, value in RECIPES[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = default_run_folder(args.model, args.dataset)
    return args


def default_run_folder(model: str, dataset: str) -> Path:
    """runs/MODEL-DATASET, e.g. runs/NetResDeep-cifar2 or runs/Net-imagefolder-photos."""
    name = dataset
    if dataset.startswith("imagefolder:"):
        name = "imagefolder-" + (Path(dataset.split(":", 1)[1]).resolve().name or "root")
    return Path("runs") / f"{model}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}"


def augmented_once(images: torch.Tensor, augment) -> torch.Tensor:
    """uint8 Tensor[N, 3, H, W]: the images through `augment` once (as they are without a policy), so
    the mean and std are those of the pixels the model trains on (half inverted, for the digits policy)."""
    return images if augment is None else augment(images)


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


def make_checkpoint(model, *, arch, arch_args, classes, mean, std, dataset, split, epoch, metrics, recipe):
    """The checkpoint: plain tensors and values only, so `weights_only=True` loads it.
    `split` ({"val_fraction", "seed"}) lets `tvserve evaluate` rebuild the same validation set;
    `recipe` ({"lr", "momentum", "augment", ...}) records how it was trained."""
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
        "recipe": recipe,
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


def majority_rate(labels: torch.Tensor) -> float:
    """The accuracy of always answering the most common class of int64 Tensor[N]."""
    return torch.bincount(labels).max().item() / len(labels)


def chance_threshold(labels: torch.Tensor) -> float:
    """The validation accuracy a run must beat to count as learning: the majority-class rate plus
    two standard errors of it over len(labels) images (a best-of-epochs pick of noise can reach
    a little above chance)."""
    rate = majority_rate(labels)
    return rate + 2 * math.sqrt(rate * (1 - rate) / len(labels))


def lr_advice(args) -> str:
    """The --lr to try next: the architecture's recipe when another was given, else a third of it."""
    recipe = RECIPES[args.model]["lr"]
    if args.lr != recipe:
        return f"--lr {recipe:g} ({args.model}'s recipe)"
    return f"a lower --lr, e.g. {args.lr / 3:.1g}"


def diverged_error(args, epoch: int, loss: float) -> TrainingError:
    return TrainingError(
        f"{args.model} diverged at epoch {epoch} (training loss {loss}) with --lr {args.lr:g} --momentum "
        f"{args.momentum:g}: try {lr_advice(args)}; no checkpoint.pt was kept.")


def chance_error(args, best: dict, val_labels: torch.Tensor) -> TrainingError:
    return TrainingError(
        f"{args.model} did not learn: its best validation accuracy {best['val_accuracy']:.1%} is no better than "
        f"always answering the most common class ({majority_rate(val_labels):.1%} of {len(val_labels)} images) "
        f"with --lr {args.lr:g} --momentum {args.momentum:g} over {args.epochs} epochs: try {lr_advice(args)}, "
        f"or more --epochs (--resume carries on); no checkpoint.pt was kept.")


def last_state(out: Path) -> Path:
    """The run folder's last.pt; TrainingError when there is none to resume from."""
    path = out / "last.pt"
    if not path.is_file():
        raise TrainingError(f"Nothing to resume: {path} does not exist. Pass the --out of an earlier run, "
                            f"or leave out --resume to start one.")
    return path


def resume_state(args, model, optimizer, shuffle):
    """Loads the run folder's last.pt into the model, optimiser and random states; returns
    (history, best, first epoch)."""
    state = torch.load(last_state(args.out), weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    shuffle.set_state(state["shuffle_rng"])
    log.info("resuming %s from epoch %d", args.out, state["epoch"])
    return state["history"], state["best"], state["epoch"] + 1


def main(args):
    """Trains `args.model` as the flags say; returns the best epoch's metrics row. Raises
    TrainingError (DatasetError) with a one-line reason when the run cannot start or learns nothing."""
    fill_defaults(args)
    if args.resume:
        last_state(args.out)  # before the dataset is loaded
    torch.manual_seed(args.seed)
    split = load_dataset(args.dataset, data_dir=args.data_dir, val_fraction=args.val_fraction, seed=args.seed)
    augment = augmentation(args.augment)
    mean, std = channel_stats(augmented_once(split.train_images, augment))
    shuffle = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(TensorDataset(split.train_images, split.train_labels), batch_size=args.batch_size,
                              shuffle=True, generator=shuffle, collate_fn=Batches(mean, std, augment))
    val_loader = DataLoader(TensorDataset(split.val_images, split.val_labels), batch_size=256,
                            collate_fn=Batches(mean, std))

    arch_args = architecture_args(args, len(split.classes))
    model = build_model(args.model, **arch_args)
    decay = args.weight_decay if args.l2_mode == "optimizer" else 0.0
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=decay)
    l2_lambda = args.weight_decay if args.l2_mode == "loss" else 0.0
    loss_fn = nn.CrossEntropyLoss()
    recipe = {"lr": args.lr, "momentum": args.momentum, "batch_size": args.batch_size, "augment": args.augment,
              "weight_decay": args.weight_decay, "l2_mode": args.l2_mode, "epochs": args.epochs, "seed": args.seed}

    args.out.mkdir(parents=True, exist_ok=True)
    history, best, first_epoch = [], None, 1
    if args.resume:
        history, best, first_epoch = resume_state(args, model, optimizer, shuffle)
    started = time.perf_counter() - (history[-1]["seconds"] if history else 0.0)
    for epoch in range(first_epoch, args.epochs + 1):
        desc = f"epoch {epoch}/{args.epochs}"
        train_loss, train_acc = train_one_epoch(model, train_loader, optimizer, loss_fn,
                                                l2_lambda=l2_lambda, desc=desc, quiet=args.quiet)
        if not math.isfinite(train_loss):
            fail(args, history, diverged_error(args, epoch, train_loss))
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
                                       split={"val_fraction": args.val_fraction, "seed": args.seed}, recipe=recipe),
                       args.out / "checkpoint.pt")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                    "torch_rng": torch.get_rng_state(), "shuffle_rng": shuffle.get_state(),
                    "history": history, "best": best}, args.out / "last.pt")
    write_metrics(args.out, history, best)
    if best is None or best["val_accuracy"] <= chance_threshold(split.val_labels):
        fail(args, history, chance_error(args, best or {"val_accuracy": 0.0}, split.val_labels))
    log.info("best val accuracy %.4f at epoch %d; checkpoint: %s",
             best["val_accuracy"], best["epoch"], args.out / "checkpoint.pt")
    return best


def write_metrics(out: Path, history: list, best: dict) -> None:
    (out / "metrics.json").write_text(json.dumps({"best": best, "epochs": history}, indent=2))
    if history:
        plot_curves(history, out / "curves.png")


def fail(args, history: list, error: TrainingError):
    """Removes the run's checkpoint.pt, which `make serve` would otherwise archive, keeps last.pt
    (finite weights, for --resume) and the metrics, and raises `error`."""
    (args.out / "checkpoint.pt").unlink(missing_ok=True)
    (args.out / "metrics.json").write_text(json.dumps({"error": str(error), "epochs": history}, indent=2))
    raise error


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        main(get_args_parser().parse_args())
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
