"""The archive's record, `tvserve.json`: what the model is, how its inputs are prepared, its labels,
its weights and its runtime. The archiver writes it (tvserve/archiving/) and the worker reads it
(handlers/tvserve_handler.py), both through this module, so the two cannot drift.

    {"format": 3, "name": "resnet18", "version": "1.0", "task": "classification", "source": "torchvision",
     "model": {"builder": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 1000}},
     "preset": {"resize": 256, "crop": 224, "interpolation": "bilinear", "mean": [...], "std": [...]},
     "labels": [...], "weights": {"file": "weights.pt", "sha256": "...", "origin": "file", ...},
     "backend": {"name": "onnxruntime", "file": "model.onnx", "sha256": "...", "selection": {...}},
       (an int8 archive's backend adds "precision": "int8" and "quantization": {...}, its measured cost,
        or, for a classifier torchvision quantized, "counterpart": {...}, the fp32 model's accuracy and time;
        a tf32, bf16 or fp16 one its "precision" and "effect": {...}, measured against fp32)
     "sizing": {"decided": ["workers", "batch_size", "max_batch_delay"], "cores": 2,
                "measured": {"concurrency": 2, "point_s": 1.0, "candidates": [...], "chosen": 0, "why": "..."}},
     "versions": {...}, "created": "...", "extra": {...}}

Archives written before the record had a version (format 1: no "format" key, always
classification) are read as they are; an archive of a newer format than this code is refused with
a message saying so. Format 3 added the tasks beyond classification: a model built by torchvision's
own builder for its pretrained `weights` (ModelSpec.weights), presets without a resize or a crop,
and the keypoint names of keypoint models; format 2 code would build such a model wrongly.
Optional parts added within a format read as absent from older records, and older code skips them:
the sizing (absent: every size counts as given) and its measured load (absent: decided by the
per-stage rule of older archivers, or given).
"""

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

METADATA_FILE = "tvserve.json"
FORMAT = 3  # 3: builder weights, partial presets, keypoint names; 2: "format" and "task"; 1: unversioned
DEFAULT_TASK = "classification"
DEFAULT_DECODE = "pil"  # exact: equal to the weights' own transforms(); "tensor" is the opt-in lossy one
DECODE_ENV = "TVSERVE_DECODE"  # a serve-time override of the record's preset.decode: pil or tensor (handlers/devices.py)


class RecordError(ValueError):
    """An archive record this code cannot use; the message says why and what to do."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ModelSpec:
    """How to build the untrained module: torchvision's builder by `name`, or `cls` from the
    Python `file` shipped in the archive; `kwargs` are the constructor's keyword arguments.
    `weights` (a weights enum member's name, e.g. COCO_V1): torchvision's builder is called for those
    pretrained weights, so that it sets up the module exactly as it does for them (frozen norm
    layers, their eps, head sizes), and is handed the archive's state_dict instead of downloading."""

    builder: str  # "torchvision" or "python"
    name: str = None
    file: str = None
    cls: str = None  # "class" in JSON
    kwargs: dict = field(default_factory=dict)
    weights: str = None

    def to_dict(self) -> dict:
        out = {"builder": self.builder, "name": self.name, "file": self.file, "class": self.cls, "kwargs": self.kwargs,
               "weights": self.weights}
        return {key: value for key, value in out.items() if value is not None}

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSpec":
        return cls(builder=data["builder"], name=data.get("name"), file=data.get("file"), cls=data.get("class"),
                   kwargs=dict(data.get("kwargs") or {}), weights=data.get("weights"))


@dataclass
class Preset:
    """Resize (shorter side, px), center crop (px), interpolation, and per-channel mean/std in
    [0, 1] units: what torchvision's ImageClassification preset holds. `jpeg_draft` (lossy, opt-in):
    JPEGs decode at a reduced DCT scale of at least twice `resize`. `decode` (handlers/devices.py's
    PREPROCESSORS): "pil", exact, or "tensor" (lossy, opt-in: JPEGs of a batch decoded together and
    resized on the worker's device, nvJPEG on a GPU); records without it read as "pil".
    The other tasks' presets leave steps out (None, and not written): SemanticSegmentation has no
    crop, ObjectDetection only converts to float (the model resizes and normalises itself).
    VideoClassification's resize is [height, width] (or [shorter side]) and its crop [height, width],
    each frame resized without antialiasing as torchvision's preset does; it adds the window and the
    rate the clip is sampled at (handlers/clips.py). OpticalFlow's only normalises to [-1, 1] and
    has the smallest input the weights take."""

    resize: int = None  # video: [height, width] or [shorter side]
    crop: int = None  # video: [height, width]
    interpolation: str = "bilinear"
    mean: list = None
    std: list = None
    jpeg_draft: bool = False
    decode: str = DEFAULT_DECODE
    clip_len: int = None  # video: frames a window of the model sees
    frame_rate: float = None  # video: frames per second the clip is sampled at before windowing
    min_size: list = None  # optical flow: [height, width], the smallest input the weights take

    def to_dict(self) -> dict:
        out = {"resize": self.resize, "crop": self.crop, "interpolation": self.interpolation if self.resize else None,
               "mean": self.mean, "std": self.std, "clip_len": self.clip_len, "frame_rate": self.frame_rate,
               "min_size": self.min_size}
        out = {key: value for key, value in out.items() if value is not None}  # steps the preset leaves out
        out = {**out, "jpeg_draft": True} if self.jpeg_draft else out
        return {**out, "decode": self.decode} if self.decode != DEFAULT_DECODE else out  # lossy choices only

    @classmethod
    def from_dict(cls, data: dict) -> "Preset":
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass
class FileEntry:
    """A file inside the archive and its sha256, checked before the worker loads it."""

    file: str = None
    sha256: str = None

    def verified(self, model_dir: Path) -> Path:
        """The file's path in the unpacked archive `model_dir`, after checking its sha256."""
        path = Path(model_dir) / self.file
        actual = sha256_of(path)
        if actual != self.sha256:
            raise RecordError(
                f"Tampered archive: {self.file} has sha256 {actual}, but the archive's {METADATA_FILE} "
                f"records {self.sha256}. Rebuild the archive with `tvserve archive`."
            )
        return path


@dataclass
class Weights(FileEntry):
    """The state_dict file; `origin` says where it came from (file, torch-hub-cache, download,
    checkpoint, random-init)."""

    origin: str = None
    source_file: str = None
    random_init: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Weights":
        return cls(**{f.name: data.get(f.name) for f in fields(cls) if f.name in data})


class Measurement:
    """A measured record's JSON: the fields left None are not written, and keys it does not know are
    not read."""

    def to_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_dict(cls, data: dict):
        return cls(**{f.name: data.get(f.name) for f in fields(cls) if f.name in data})


@dataclass
class Quantization(Measurement):
    """What a reduced precision cost, measured at archive time (tvserve/archiving/calibration.py) on
    the held-out part of the user's calibration images, preprocessed as the worker does: top-1
    agreement with the fp32 model (fraction), the largest change of any softmax probability, and,
    where the folder's sub-folders name the labels, the top-1 accuracy (fraction) of both. int8 is
    made by the recipe (calibration method, per-channel or per-tensor weights, QOperator or QDQ)
    that agreed best of those `tried` on the same held-out images (calibration.choose_recipe)."""

    method: str
    calibration_dir: str
    calibration_images: int  # images the activation ranges were taken from
    held_out_images: int  # images the numbers below were measured on
    top1_agreement: float
    max_probability_change: float
    min_agreement: float  # the threshold the archive was held to
    accuracy_fp32: float = None  # None: the images' labels were not known
    accuracy_int8: float = None
    recipe: dict = None  # the quantizer's choices kept (method, per_channel, quant_format); None: before the search
    tried: list = None  # every recipe tried: its choices, top1_agreement, max_probability_change, seconds; or skipped


@dataclass
class PrecisionEffect(Measurement):
    """What running in `precision` (tf32, bf16, fp16; handlers/precision.py) changed against the
    fp32 eager model, measured at archive time (tvserve/archiving/calibration.py) on `images` (what they
    were: the user's --calibration folder, or images made at archive time) on the device named by
    `measured_on`: top-1 agreement (fraction), the largest change of any softmax probability, and,
    where the images' labels are known, the top-1 accuracy (fraction) of both."""

    precision: str
    method: str  # the runtime, and what the precision did on the measuring device (precision.describe)
    images: str
    measured_images: int
    top1_agreement: float
    max_probability_change: float
    min_agreement: float  # below it the archive was written with a warning
    measured_on: str  # e.g. "cpu (Intel Xeon ...)": a CPU's bf16 and fp16 kernels differ from a GPU's
    accuracy_fp32: float = None  # None: the images' labels were not known
    accuracy_reduced: float = None


@dataclass
class Counterpart(Measurement):
    """A classifier torchvision quantized (torchvision.models.quantization) against the fp32 model its
    int8 weights were made from (their meta's "unquantized"): ImageNet-1K top-1 accuracy (%) of both,
    from torchvision's meta (not measured here), and the median forward of one image, batch 1, on
    `threads` threads of this CPU (ms), both timed in turns at archive time (tvserve/archiving/tuning.py;
    the fp32 model with random weights: its values do not change its time)."""

    model: str  # the fp32 model, e.g. resnet18
    weights: str  # its weights, e.g. ResNet18_Weights.IMAGENET1K_V1
    engine: str  # the quantized engine the int8 weights were made for: fbgemm or qnnpack
    acc1_int8: float
    acc1_fp32: float
    forward_ms_int8: float
    forward_ms_fp32: float
    threads: int


@dataclass
class Backend(FileEntry):
    """The runtime the worker runs the model with (handlers/runtimes.py), its exported file (none
    for eager), the measurements it was chosen on (tvserve/archiving/tuning.py) and its precision: fp32
    (records before int8 existed read as fp32), int8 with its measured `quantization` cost, or
    tf32, bf16, fp16 with their measured `effect`; a classifier torchvision quantized runs int8 on its
    engine's runtime (quantized_fbgemm, quantized_qnnpack), with its `counterpart`, the fp32 model."""

    name: str = "eager"
    selection: dict = field(default_factory=dict)
    precision: str = "fp32"
    quantization: Quantization = None
    effect: PrecisionEffect = None
    counterpart: Counterpart = None

    def to_dict(self) -> dict:
        out = {"name": self.name, "file": self.file, "sha256": self.sha256, "precision": self.precision,
               "quantization": self.quantization and self.quantization.to_dict(),
               "effect": self.effect and self.effect.to_dict(),
               "counterpart": self.counterpart and self.counterpart.to_dict(), "selection": self.selection}
        return {key: value for key, value in out.items() if value is not None}

    @classmethod
    def from_dict(cls, data: dict) -> "Backend":
        quantization, effect, counterpart = data.get("quantization"), data.get("effect"), data.get("counterpart")
        return cls(name=data["name"], file=data.get("file"), sha256=data.get("sha256"),
                   selection=dict(data.get("selection") or {}), precision=data.get("precision", "fp32"),
                   quantization=Quantization.from_dict(quantization) if quantization else None,
                   effect=PrecisionEffect.from_dict(effect) if effect else None,
                   counterpart=Counterpart.from_dict(counterpart) if counterpart else None)


SIZES = ("workers", "batch_size", "max_batch_delay")  # model-config.yaml's serving sizes, as ArchiveOptions names them


@dataclass
class MeasuredLoad(Measurement):
    """The short load the archiver sized the archive by (tvserve/archiving/measured_load.py): each
    candidate {"workers", "threads" (per worker), "batch_size", "c1_p50_ms" (one client),
    "load_rps" (`concurrency` closed-loop clients: the cores' worth)}, each point `point_s` seconds,
    the index of the one `chosen` and `why`. A model too slow to measure in seconds records no
    candidates, chosen None, and why its sizes were set without a measurement."""

    concurrency: int
    point_s: float
    candidates: list
    why: str
    chosen: int = None

    def winner(self) -> dict:
        """The chosen candidate, or None where nothing was measured."""
        return None if self.chosen is None else self.candidates[self.chosen]


@dataclass
class Sizing:
    """Which of the archive's serving sizes (SIZES) the archiver decided rather than the user gave,
    the cores of the machine it decided them on, and the load it `measured` there (MeasuredLoad;
    None in archives sized before sizes were measured). A server may re-size what was decided for
    its own machine (tvserve/ops/sizing.py), never what was given. Records without it (older
    archives) have none: every size counts as given, and they are never re-sized."""

    decided: tuple = ()
    cores: int = None
    measured: MeasuredLoad = None

    def shares_cores(self) -> bool:
        """Whether the measured winner is the shared shape (tvserve/archiving/measured_load.py): decided
        workers that each had every core's threads (workers x threads over the cores), taking turns."""
        winner = self.measured and self.measured.winner()
        return bool(winner and "workers" in self.decided and winner["workers"] > 1
                    and winner["workers"] * winner["threads"] > self.cores)

    def to_dict(self) -> dict:
        out = {"decided": list(self.decided), "cores": self.cores}
        return {**out, "measured": self.measured.to_dict()} if self.measured else out

    @classmethod
    def from_dict(cls, data: dict) -> "Sizing":
        measured = data.get("measured")
        return cls(decided=tuple(name for name in data.get("decided", ()) if name in SIZES), cores=data.get("cores"),
                   measured=MeasuredLoad.from_dict(measured) if measured else None)


@dataclass
class Record:
    """Everything an archive records about its model (see the module docstring for the JSON)."""

    name: str
    source: str  # torchvision, checkpoint or custom
    model: ModelSpec
    preset: Preset
    labels: list
    task: str = DEFAULT_TASK
    keypoint_names: list = None  # keypoints task: the names of the model's keypoints, in order
    weights: Weights = None
    backend: Backend = None
    sizing: Sizing = None  # None: an archive from before sizing was recorded (every size counts as given)
    version: str = None
    versions: dict = None  # library versions at archive time
    created: str = None
    extra: dict = field(default_factory=dict)
    format: int = FORMAT

    def to_dict(self) -> dict:
        out = {
            "format": self.format, "name": self.name, "version": self.version, "task": self.task,
            "source": self.source, "model": self.model.to_dict(), "preset": self.preset.to_dict(),
            "labels": list(self.labels), "keypoint_names": self.keypoint_names, "weights": self.weights and self.weights.to_dict(),
            "backend": self.backend and self.backend.to_dict(),
            "sizing": self.sizing and self.sizing.to_dict(), "versions": self.versions,
            "created": self.created, "extra": self.extra,
        }
        return {key: value for key, value in out.items() if value is not None}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> "Record":
        fmt = int(data.get("format", 1))
        if fmt > FORMAT:
            raise RecordError(f"This archive's record is format {fmt}; this tvserve reads formats up to {FORMAT}. "
                              "Upgrade tvserve, or rebuild the archive with this version.")
        try:
            return cls(
                name=data["name"], source=data["source"], model=ModelSpec.from_dict(data["model"]),
                preset=Preset.from_dict(data["preset"]), labels=list(data["labels"]),
                task=data.get("task", DEFAULT_TASK), keypoint_names=data.get("keypoint_names"),
                weights=Weights.from_dict(data["weights"]) if data.get("weights") else None,
                backend=Backend.from_dict(data["backend"]) if data.get("backend") else None,
                sizing=Sizing.from_dict(data["sizing"]) if data.get("sizing") else None,
                version=data.get("version"), versions=data.get("versions"), created=data.get("created"),
                extra=dict(data.get("extra") or {}), format=fmt,
            )
        except (KeyError, TypeError) as err:
            raise RecordError(f"The archive's {METADATA_FILE} is incomplete or malformed ({type(err).__name__}: "
                              f"{err}). Rebuild the archive with `tvserve archive`.") from None

    @classmethod
    def from_json(cls, text) -> "Record":
        return cls.from_dict(json.loads(text))

    @classmethod
    def read(cls, model_dir: Path) -> "Record":
        """The record of an unpacked archive (a worker's model_dir)."""
        return cls.from_json((Path(model_dir) / METADATA_FILE).read_text())
