"""torchvision's pretrained models, by task: their weights, preset, labels and construction arguments.

Tasks: classification (torchvision.models), detection, instance segmentation (Mask R-CNN) and
keypoints (Keypoint R-CNN) (torchvision.models.detection), semantic segmentation
(torchvision.models.segmentation), video classification (torchvision.models.video) and optical
flow (torchvision.models.optical_flow). Everything an archive records about a torchvision model is read
from its `Weights` enum (`weights.transforms()`, `weights.meta`), never re-typed.
"""

import logging
import math
import os
import re
from pathlib import Path
from urllib.error import URLError

import torch
import torchvision
from torchvision.models import get_model_weights, list_models

from tvserve import TvserveError
from tvserve.archiving.presets import CLIP_PRESETS

log = logging.getLogger(__name__)

HASH_PREFIX = re.compile(r"-([a-f0-9]{6,})\.")  # torch.hub's convention: name-<sha256 prefix>.pth


def classification_models() -> list:
    return list_models(module=torchvision.models)


def quantized_models() -> list:
    """torchvision's int8 classifiers (torchvision.models.quantization; quantized_resnet18, ...), listed
    with classification: weights quantized by torchvision for one CPU engine, which their meta names
    ("backend": fbgemm or qnnpack)."""
    return list_models(module=torchvision.models.quantization)


def is_quantized(name: str) -> bool:
    return name in quantized_models()


def quantized_builder_kwargs(name: str) -> dict:
    """torchvision's builder arguments for quantized `name`'s weights: quantize=True, and for googlenet
    and inception_v3 aux_logits=True, so that it keeps the auxiliary heads their weights hold (the
    builder drops them after loading otherwise; eval never runs them) and the weights reload strictly."""
    return {"quantize": True, **({"aux_logits": True} if name in ("quantized_googlenet", "quantized_inception_v3") else {})}


def fp32_counterpart(name: str, weights) -> tuple:
    """(model name, weights enum member) of the fp32 model that quantized `name`'s `weights` were made
    from: the weights' meta "unquantized", built by the same name without "quantized_"."""
    return name.removeprefix("quantized_"), weights.meta["unquantized"]


TASK_ORDER = ("classification", "detection", "instance_segmentation", "keypoints", "semantic_segmentation",
              "video_classification", "optical_flow")
MODULE_TASKS = {"video_classification": torchvision.models.video, "optical_flow": torchvision.models.optical_flow}


def task_of(name: str) -> str:
    """The task of torchvision model `name` (a classification model when in no other module)."""
    for task, module in MODULE_TASKS.items():
        if name in list_models(module=module):
            return task
    if name in list_models(module=torchvision.models.segmentation):
        return "semantic_segmentation"
    if name in list_models(module=torchvision.models.detection):
        return {"maskrcnn": "instance_segmentation", "keypointrcnn": "keypoints"}.get(name.split("_")[0], "detection")
    return "classification"


def models_by_task() -> dict:
    """{task: [model names]} for every pretrained torchvision model tvserve archives."""
    names = (classification_models() + quantized_models() + list_models(module=torchvision.models.detection)
             + list_models(module=torchvision.models.segmentation)
             + [name for module in MODULE_TASKS.values() for name in list_models(module=module)])
    tasks = {task: [] for task in TASK_ORDER}
    for name in names:
        tasks[task_of(name)].append(name)
    return tasks


def all_models() -> list:
    return [name for names in models_by_task().values() for name in names]


def get_weights(name: str, weights: str = "DEFAULT"):
    """The weights enum member `weights` (DEFAULT, IMAGENET1K_V1, COCO_V1, ...) of model `name`."""
    if name not in all_models():
        raise TvserveError(f"Unknown torchvision model {name!r} (classification, detection or segmentation). "
                           "`tvserve zoo` lists them.")
    enum = get_model_weights(name)
    try:
        member = enum[weights]
    except KeyError:
        raise TvserveError(
            f"Invalid weights {weights!r} for {name}. Choose DEFAULT or one of: {', '.join(enum.__members__)}."
        ) from None
    if not member.meta.get("categories") and task_of(name) != "optical_flow":  # flow answers no classes
        raise TvserveError(f"{member} has no classifier head (feature-extraction weights): choose other weights.")
    return member


def preset_of(weights) -> dict:
    """The preset recorded in archives, read from `weights.transforms()`: an ImageClassification
    (resize, crop, interpolation, mean, std), a SemanticSegmentation (no crop), an
    ObjectDetection (nothing: it only converts to float), or a video or flow preset (presets.py)."""
    transform = weights.transforms()
    if type(transform).__name__ in CLIP_PRESETS:
        return CLIP_PRESETS[type(transform).__name__](weights)
    if not hasattr(transform, "resize_size"):  # ObjectDetection
        return {}
    if not hasattr(transform, "crop_size"):  # SemanticSegmentation
        return {"resize": int(transform.resize_size[0]), "interpolation": transform.interpolation.value,
                "mean": [float(x) for x in transform.mean], "std": [float(x) for x in transform.std]}
    return {
        "resize": int(transform.resize_size[0]),
        "crop": int(transform.crop_size[0]),
        "interpolation": transform.interpolation.value,
        "mean": [float(x) for x in transform.mean],
        "std": [float(x) for x in transform.std],
    }


def builder_kwargs(name: str, weights) -> dict:
    """The keyword arguments torchvision's builder sets when it loads `weights` (see
    `_ovewrite_named_param` in torchvision.models), so `get_model(name, weights=None, **kwargs)`
    builds the same module that the pretrained weights load into."""
    kwargs = {"num_classes": len(weights.meta["categories"])}
    if name in ("inception_v3", "googlenet"):
        kwargs.update(transform_input=True, aux_logits=True, init_weights=False)
    elif name.startswith("vit_"):
        kwargs["image_size"] = weights.meta["min_size"][0]
    elif name.startswith("maxvit"):
        kwargs["input_size"] = list(weights.meta["min_size"])
    return kwargs


def cached_weights_path(weights) -> Path:
    """Where torch.hub keeps (and torchvision looks for) the downloaded weights file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def check_hash_prefix(path: Path, sha256: str) -> None:
    """A file named like torchvision's `resnet18-f37072fd.pth` must match that hash prefix."""
    match = HASH_PREFIX.search(path.name)
    if match and not sha256.startswith(match.group(1)):
        raise TvserveError(
            f"{path} is corrupt or not the file its name claims: its sha256 starts with "
            f"{sha256[:len(match.group(1))]}, its name says {match.group(1)}. Download it again."
        )


def find_weights_file(name: str, weights, weights_file=None, progress: bool = True) -> tuple:
    """Returns (path of a state_dict file, origin) for `weights`, in this order: `weights_file`,
    the torch hub cache, a download through torchvision. Raises TvserveError when none works."""
    if weights_file is not None:
        path = Path(weights_file)
        if not path.is_file():
            raise TvserveError(f"--weights-file {path} does not exist.")
        return path, "file"
    cached = cached_weights_path(weights)
    if cached.is_file():
        return cached, "torch-hub-cache"
    log.info("downloading %s weights %s from %s", name, weights, weights.url)
    try:
        weights.get_state_dict(progress=progress, check_hash=True)
    except (URLError, OSError, RuntimeError) as err:
        raise TvserveError(
            f"Cannot get the weights for {name} ({weights}): download failed ({err}). "
            f"Looked for {cached.name} in the torch hub cache {cached.parent}. "
            f"Put that file there (or set TORCH_HOME), or pass --weights-file PATH."
        ) from None
    return cached, "download"


def imagenet_acc1(weights):
    """ImageNet-1K top-1 accuracy (%) from the weights' meta; None where it records none (or NaN)."""
    acc = weights.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
    return None if acc is None or math.isnan(acc) else acc


METRICS = {  # the headline metric of each task in the weights' meta: (dataset, key, name shown)
    "classification": ("ImageNet-1K", "acc@1", "acc@1"),
    "detection": ("COCO-val2017", "box_map", "box mAP"),
    "instance_segmentation": ("COCO-val2017", "mask_map", "mask mAP"),
    "keypoints": ("COCO-val2017", "kp_map", "kp mAP"),
    "semantic_segmentation": ("COCO-val2017-VOC-labels", "miou", "mIoU"),
    "video_classification": ("Kinetics-400", "acc@1", "acc@1"),
    "optical_flow": ("Sintel-Train-Finalpass", "epe", "Sintel final EPE"),
}


def headline_metric(task: str, weights):
    """(name, value) of the task's headline metric from the weights' meta; value None where absent."""
    dataset, key, shown = METRICS[task]
    value = weights.meta.get("_metrics", {}).get(dataset, {}).get(key)
    return shown, None if value is None or math.isnan(value) else value


def quantized_columns(name: str, weights) -> dict:
    """A quantized model's row adds its engine and its fp32 counterpart's weights and accuracy."""
    if not is_quantized(name):
        return {}
    counterpart = fp32_counterpart(name, weights)[1]
    return {"engine": weights.meta["backend"], "fp32_weights": str(counterpart),
            "fp32_acc@1": imagenet_acc1(counterpart)}


def zoo() -> list:
    """Every pretrained model, one row per weights enum, by task, from the enums' own meta."""
    rows = []
    for task, names in models_by_task().items():
        for name in names:
            enum = get_model_weights(name)
            for weights in enum:
                preset, (metric, value) = preset_of(weights), headline_metric(task, weights)
                rows.append({
                    "task": task,
                    "model": name,
                    "weights": weights.name,
                    "default": weights is enum.DEFAULT,
                    "params": weights.meta["num_params"],
                    "resize": preset.get("resize"),
                    "crop": preset.get("crop"),
                    "interpolation": preset.get("interpolation"),
                    "acc@1": imagenet_acc1(weights) if task == "classification" else None,
                    "metric": metric,
                    "value": value,
                    **quantized_columns(name, weights),
                })
    return rows
