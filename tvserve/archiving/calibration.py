"""Calibration images for an int8 archive, and the accuracy cost measured on them; the same
measurement for tf32, bf16 and fp16 (their effect).

The user's folder (a few hundred images is typical) is split in two, per label where its
sub-folders name the model's labels: the activation ranges are taken from one part, and the int8
model is compared with the fp32 one on the held-out rest, every image preprocessed exactly as the
worker does (handlers/devices.PilPreprocessing). The archive is refused, with the numbers, when
the top-1 agreement is below the user's threshold (--min-agreement).
tf32, bf16 and fp16 calibrate nothing: they are compared with fp32 on every image of the folder,
or, without one, on SYNTHETIC_IMAGES photo-like JPEGs made at archive time; below --min-agreement
the archive is written with a warning.
"""

import logging
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from handlers.devices import PilPreprocessing
from handlers.errors import RequestError
from handlers.record import Counterpart, PrecisionEffect, Preset, Quantization
from handlers.runtimes import Int8Recipe, export, load_runner
from tvserve import TvserveError
from tvserve.archiving.tuning import sample_jpeg

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
HELD_OUT_FRACTION = 0.5  # half calibrates, half measures: a few hundred images give ~1% steps either way
SPLIT_SEED = 0  # the split repeats exactly for the same folder
BATCH = 16  # images per calibration and measurement forward
DEFAULT_MIN_AGREEMENT = 0.99
SYNTHETIC_IMAGES = 16  # tf32/bf16/fp16 without --calibration: enough for a probability change, not an accuracy
METHODS = ("MinMax", "Percentile", "Entropy")  # ONNX Runtime's calibration methods tried, the cheapest first
RECIPE_BUDGET_S = 300  # s of recipe search per int8 archive before a recipe is skipped (resnet18 here: see docs)


@dataclass
class CalibrationSet:
    """A calibration folder split in two: `calibrate` (the quantizer's ranges) and `held_out`
    (the measured cost), each Tensor[N, 3, crop, crop] float32 as the worker preprocesses;
    `held_out_labels` Tensor[N] of label indices, or None where the folder does not name them."""

    folder: Path
    calibrate: torch.Tensor
    held_out: torch.Tensor
    held_out_labels: torch.Tensor = None

    def calibration_batches(self) -> list:
        """The calibration images in batches of BATCH: [Tensor[<=BATCH, 3, crop, crop]]."""
        return list(self.calibrate.split(BATCH))


def image_files(folder: Path) -> list:
    """Every image file under `folder` (any depth), sorted."""
    return sorted(path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)


def label_of(path: Path, folder: Path, labels: list):
    """The index of the label that names `path`'s sub-folder of `folder`, else None."""
    parts = path.relative_to(folder).parts
    return labels.index(parts[0]) if len(parts) == 2 and parts[0] in labels else None


def split(files: list, groups: list) -> tuple:
    """(calibrate, held_out) lists of indices into `files`: each group (a label, or one group for
    unlabelled folders) shuffled with SPLIT_SEED, its first half calibrating, the rest held out."""
    calibrate, held_out = [], []
    rng = random.Random(SPLIT_SEED)
    for group in sorted(set(groups), key=str):
        members = [i for i, g in enumerate(groups) if g == group]
        rng.shuffle(members)
        n_calibrate = max(1, round(len(members) * (1 - HELD_OUT_FRACTION))) if len(members) > 1 else len(members)
        calibrate += members[:n_calibrate]
        held_out += members[n_calibrate:]
    return sorted(calibrate), sorted(held_out)


def preprocess(paths: list, preset: Preset) -> torch.Tensor:
    """Tensor[N, 3, crop, crop] float32 for image files, decoded and preprocessed as the worker does."""
    transform = PilPreprocessing(preset)
    tensors = []
    for path in paths:
        try:
            tensors.append(transform(path.read_bytes()))
        except RequestError as err:
            raise TvserveError(f"Calibration image {path} cannot be used: {err.message} Remove it and retry.") from None
    return torch.stack(tensors)


def labelled_files(folder, labels: list, at_least: int = 2) -> tuple:
    """(image files, their label indices or None) of a calibration folder. Its images are labelled
    when every one sits in a sub-folder named after one of the model's labels (an image folder of
    class sub-folders). Raises TvserveError for a missing folder or fewer than `at_least` images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TvserveError(f"--calibration {folder} is not a folder: give a folder of images (a few hundred "
                           "is typical; class sub-folders named after the labels add accuracies).")
    files = image_files(folder)
    if len(files) < at_least:
        raise TvserveError(f"--calibration {folder} holds {len(files)} image(s): at least {at_least} are needed (a "
                           "few hundred is typical; int8 calibrates on half and measures its cost on the rest).")
    found = [label_of(path, folder, labels) for path in files]
    labelled = all(index is not None for index in found)
    if not labelled and any(index is not None for index in found):
        others = sorted({path.relative_to(folder).parts[0] for path, index in zip(files, found) if index is None})
        log.warning("calibration: %s are not sub-folders named after labels: accuracies are not measured",
                    ", ".join(others[:5]))
    return files, found if labelled else None


def split_files(folder, labels: list) -> tuple:
    """(calibrate files, held-out files, held-out label indices or None) of a calibration folder
    (labelled_files); a labelled folder is split per label."""
    folder = Path(folder)
    files, found = labelled_files(folder, labels)
    labelled = found is not None
    calibrate, held_out = split(files, found if labelled else [None] * len(files))
    if not held_out:
        raise TvserveError(f"--calibration {folder}: no image is left to measure on; add images.")
    log.info("calibration: %d images from %s, %d to calibrate, %d held out%s", len(files), folder, len(calibrate),
             len(held_out), " (labelled by sub-folder)" if labelled else "")
    return ([files[i] for i in calibrate], [files[i] for i in held_out],
            [found[i] for i in held_out] if labelled else None)


def read_calibration(folder, preset: Preset, labels: list) -> CalibrationSet:
    """The calibration set of `folder` (split_files), preprocessed as the worker does."""
    calibrate, held_out, held_out_labels = split_files(folder, labels)
    return CalibrationSet(folder=Path(folder), calibrate=preprocess(calibrate, preset),
                          held_out=preprocess(held_out, preset),
                          held_out_labels=None if held_out_labels is None else torch.tensor(held_out_labels))


@dataclass
class MeasurementSet:
    """Images to measure a precision's effect on: Tensor[N, 3, crop, crop] float32 as the worker
    preprocesses, their label indices Tensor[N] or None, and what they were (for the record)."""

    images: torch.Tensor
    labels: torch.Tensor
    what: str


def read_measurement_set(folder, preset: Preset, labels: list) -> MeasurementSet:
    """Every image of a --calibration folder (labelled_files), preprocessed as the worker does."""
    files, found = labelled_files(folder, labels, at_least=1)
    return MeasurementSet(images=preprocess(files, preset), labels=None if found is None else torch.tensor(found),
                          what=f"{len(files)} images of --calibration {Path(folder).resolve()}"
                               f"{' (labelled by sub-folder)' if found is not None else ''}")


def synthetic_measurement_set(preset: Preset, count: int = SYNTHETIC_IMAGES) -> MeasurementSet:
    """`count` photo-like JPEGs made at archive time (tuning.sample_jpeg, seeds 0 to count-1),
    preprocessed as the worker does; no labels."""
    transform = PilPreprocessing(preset)
    images = torch.stack([transform(sample_jpeg(seed=seed)) for seed in range(count)])
    return MeasurementSet(images=images, labels=None,
                          what=f"{count} synthetic 866x577 JPEGs made at archive time (tvserve.archiving.tuning."
                               f"sample_jpeg, seeds 0-{count - 1}: gradients and grain, no labels)")


def scores(runner, task, images: torch.Tensor) -> torch.Tensor:
    """The task's scores (classification: probabilities) Tensor[N, n_labels] for Tensor[N, 3, H, W]."""
    with torch.inference_mode():
        return torch.cat([task.scores(runner(batch)) for batch in images.split(BATCH)])


def compare(reference_runner, reduced_runner, task, images: torch.Tensor, labels: torch.Tensor = None) -> dict:
    """How `reduced_runner` answers against `reference_runner` on `images` (agreement)."""
    return agreement(*(scores(runner, task, images) for runner in (reference_runner, reduced_runner)), labels)


def agreement(reference: torch.Tensor, reduced: torch.Tensor, labels: torch.Tensor = None) -> dict:
    """How scores `reduced` Tensor[N, n_labels] answer against `reference`: {"top1_agreement",
    "max_probability_change", "accuracy_reference", "accuracy_reduced"} (fractions; accuracies None
    without `labels` Tensor[N])."""
    top1 = reference.argmax(1), reduced.argmax(1)
    accuracy = (lambda predicted: round((predicted == labels).float().mean().item(), 6)) if labels is not None else None
    return {"top1_agreement": round((top1[0] == top1[1]).float().mean().item(), 6),
            "max_probability_change": round((reference - reduced).abs().max().item(), 6),
            "accuracy_reference": accuracy and accuracy(top1[0]), "accuracy_reduced": accuracy and accuracy(top1[1])}


def recipe_variants(best: Int8Recipe) -> list:
    """The second round: the best method with its weights per tensor, and in QDQ format."""
    return [replace(best, per_channel=False), replace(best, quant_format="QDQ")]


@dataclass
class RecipeSearch:
    """The int8 recipes tried on one archive (choose_recipe): the chosen one, its quantized file, and
    each tried recipe's choices with its top1_agreement and max_probability_change on the held-out
    images and the seconds it took, or {"skipped": why} past the time budget."""

    best: Int8Recipe
    path: Path
    tried: list


def try_recipe(recipe: Int8Recipe, model, task, calibration: CalibrationSet, reference: torch.Tensor, folder: Path,
               threads: int) -> tuple:
    """(path of the int8 model made by `recipe` in `folder`, its row: the recipe's choices, top-1
    agreement and largest probability change against `reference` scores on the held-out images, s)."""
    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    path = export("onnxruntime_int8", model, calibration.held_out.shape[-1], folder,
                  calibration=calibration.calibration_batches(), recipe=recipe,
                  ranges=folder.parent / f"ranges-{recipe.method}.json")  # the second round reuses its method's
    found = agreement(reference, scores(load_runner("onnxruntime_int8", path=path, threads=threads), task,
                                        calibration.held_out))
    row = {**recipe.to_dict(), "top1_agreement": found["top1_agreement"],
           "max_probability_change": found["max_probability_change"],
           "seconds": round(time.perf_counter() - start, 1)}
    log.info("int8 %s: top-1 agreement %.1f%%, largest probability change %.3g (%.0f s)", recipe.describe(),
             100 * row["top1_agreement"], row["max_probability_change"], row["seconds"])
    return path, row


def choose_recipe(model, task, calibration: CalibrationSet, folder: Path, threads: int,
                  budget_s: float = RECIPE_BUDGET_S) -> RecipeSearch:
    """The int8 recipe whose model agrees best with the fp32 `model` on the held-out images: highest
    top-1 agreement, then smallest largest probability change, then the earliest tried (the faster
    kinds come first). Tried in two rounds: each of METHODS per output channel in QOperator
    format, then the best one's recipe_variants. The first recipe always runs; after it, a recipe
    starts only while less than `budget_s` seconds have gone (the rest are listed as skipped)."""
    start = time.perf_counter()
    with torch.inference_mode():
        reference = scores(load_runner("eager", model=model.eval()), task, calibration.held_out)
    results, tried = [], []  # results: (recipe, path, row) of those run
    for round_ in (lambda: [Int8Recipe(method=method) for method in METHODS],
                   lambda: recipe_variants(best_of(results)[0])):
        for recipe in round_():
            if results and time.perf_counter() - start > budget_s:
                tried.append({**recipe.to_dict(), "skipped": f"past the {budget_s:g} s budget"})
                continue
            path, row = try_recipe(recipe, model, task, calibration, reference, folder / f"recipe-{len(tried)}",
                                   threads)
            results.append((recipe, path, row))
            tried.append(row)
    best, path, _ = best_of(results)
    return RecipeSearch(best=best, path=path, tried=tried)


def best_of(results: list) -> tuple:
    """The (recipe, path, row) with the highest agreement, then the smallest probability change;
    the earliest among equals."""
    return min(results, key=lambda r: (-r[2]["top1_agreement"], r[2]["max_probability_change"]))


def measure(fp32_runner, int8_runner, task, calibration: CalibrationSet, *, method: str,
            min_agreement: float, search: RecipeSearch = None) -> Quantization:
    """The int8 runner's cost against the fp32 one on the held-out images; with the recipe search
    that made it, its recipe and every recipe tried."""
    found = compare(fp32_runner, int8_runner, task, calibration.held_out, calibration.held_out_labels)
    return Quantization(
        method=method, recipe=search and search.best.to_dict(), tried=search and search.tried,
        calibration_dir=str(calibration.folder.resolve()),
        calibration_images=len(calibration.calibrate), held_out_images=len(calibration.held_out),
        top1_agreement=found["top1_agreement"], max_probability_change=found["max_probability_change"],
        min_agreement=min_agreement, accuracy_fp32=found["accuracy_reference"], accuracy_int8=found["accuracy_reduced"],
    )


def measure_effect(fp32_runner, reduced_runner, task, measured: MeasurementSet, *, precision: str, method: str,
                   measured_on: str, min_agreement: float) -> PrecisionEffect:
    """`reduced_runner`'s effect (precision tf32, bf16 or fp16) against the fp32 one on `measured`."""
    found = compare(fp32_runner, reduced_runner, task, measured.images, measured.labels)
    return PrecisionEffect(
        precision=precision, method=method, images=measured.what, measured_images=len(measured.images),
        top1_agreement=found["top1_agreement"], max_probability_change=found["max_probability_change"],
        min_agreement=min_agreement, measured_on=measured_on, accuracy_fp32=found["accuracy_reference"],
        accuracy_reduced=found["accuracy_reduced"],
    )


def comparison(precision: str, agreement: float, count: int, images: str, change: float, accuracy_fp32: float,
               accuracy_reduced: float) -> str:
    """What both summaries say: top-1 agreement over `count` `images`, the largest probability change,
    and the accuracies where known."""
    line = (f"top-1 agreement with fp32 {100 * agreement:.1f}% ({round(agreement * count)}/{count} {images}), "
            f"largest probability change {change:.3g}")
    if accuracy_fp32 is not None:
        line += f", accuracy fp32 {100 * accuracy_fp32:.1f}% / {precision} {100 * accuracy_reduced:.1f}%"
    return line


def summary(cost: Quantization, precision: str = "int8") -> str:
    """One line: the measured cost of `precision` against fp32."""
    recipe = cost.recipe and (f"; {cost.recipe['method']}, weights per "
                              f"{'channel' if cost.recipe['per_channel'] else 'tensor'}, {cost.recipe['quant_format']}, "
                              f"the best of {sum('skipped' not in row for row in cost.tried)} recipes tried")
    return (comparison(precision, cost.top1_agreement, cost.held_out_images, "held-out images",
                       cost.max_probability_change, cost.accuracy_fp32, cost.accuracy_int8)
            + f" (calibrated on {cost.calibration_images} images{recipe or ''})")


def effect_summary(effect: PrecisionEffect) -> str:
    """One line: what running in effect.precision changed against fp32, and where it was measured."""
    return (comparison(effect.precision, effect.top1_agreement, effect.measured_images, "images",
                       effect.max_probability_change, effect.accuracy_fp32, effect.accuracy_reduced)
            + f" (measured on {effect.measured_on}: {effect.method})")


def counterpart_summary(counterpart: Counterpart) -> str:
    """One line: a classifier torchvision quantized against its fp32 counterpart, accuracy from the
    weights' meta and forward time measured at archive time."""
    return (f"int8 (torchvision, {counterpart.engine}): ImageNet-1K acc@1 {counterpart.acc1_int8:.2f}% against "
            f"{counterpart.model}'s {counterpart.acc1_fp32:.2f}% ({counterpart.weights}, torchvision's figures); "
            f"forward {counterpart.forward_ms_int8:.2f} ms against {counterpart.forward_ms_fp32:.2f} ms "
            f"({counterpart.forward_ms_fp32 / counterpart.forward_ms_int8:.1f}x; one image, "
            f"{counterpart.threads} threads, measured at archive time)")


def warn_effect(effect: PrecisionEffect) -> None:
    """Logs the effect; a warning, not a refusal, when the agreement is below the threshold."""
    if effect.top1_agreement < effect.min_agreement:
        log.warning("%s: %s; below --min-agreement %g: the archive is written, check its answers before serving it",
                    effect.precision, effect_summary(effect), effect.min_agreement)
    else:
        log.info("%s: %s", effect.precision, effect_summary(effect))


def check(cost: Quantization, precision: str = "int8") -> None:
    """Raises TvserveError, with the numbers, when the agreement is below the threshold."""
    if cost.top1_agreement < cost.min_agreement:
        raise TvserveError(
            f"{precision} refused: {summary(cost, precision)}; below --min-agreement {cost.min_agreement:g}. "
            "Calibrate on more (and more typical) images, lower --min-agreement, or archive in fp32."
        )
    log.info("%s: %s", precision, summary(cost, precision))
