"""The presets of torchvision's video and optical-flow weights, read from the weights themselves.

A video preset is torchvision's `VideoClassification` (resize, crop, interpolation, mean, std),
plus how the weights were evaluated: the window a forward sees (`clip_len` frames) and the rate the
clip is resampled to first (`frame_rate`, frames per second). torchvision keeps those two in the
weights' `meta["_docs"]` text ("... with parameters `frame_rate=15`, `clips_per_video=5`, and
`clip_len=16`"), the only place they are written, so they are read from there. An optical-flow
preset (`OpticalFlow`) maps [0, 1] to [-1, 1] (mean and std 0.5) and has the smallest input the
weights take (`meta["min_size"]`, height and width).
"""

import re

from tvserve import TvserveError

EVALUATION = {"frame_rate": re.compile(r"frame_rate=([0-9.]+)"), "clip_len": re.compile(r"clip_len=([0-9]+)")}


def evaluation_parameters(weights) -> dict:
    """{"frame_rate": fps, "clip_len": frames} from the weights' meta["_docs"]."""
    docs = weights.meta.get("_docs", "")
    found = {key: pattern.search(docs) for key, pattern in EVALUATION.items()}
    missing = [key for key, match in found.items() if not match]
    if missing:
        raise TvserveError(f"{weights}'s meta does not say its {' and '.join(missing)} (torchvision writes them in "
                           "meta['_docs']): this torchvision's video weights are not supported yet.")
    return {"frame_rate": float(found["frame_rate"].group(1)), "clip_len": int(found["clip_len"].group(1))}


def video_preset(weights) -> dict:
    """The VideoClassification preset: resize ([h, w], or [shorter side]), crop [h, w], interpolation,
    mean, std, clip_len (frames a window) and frame_rate (frames per second the clip is sampled at)."""
    transform = weights.transforms()
    return {"resize": [int(x) for x in transform.resize_size], "crop": [int(x) for x in transform.crop_size],
            "interpolation": transform.interpolation.value, "mean": [float(x) for x in transform.mean],
            "std": [float(x) for x in transform.std], **evaluation_parameters(weights)}


def flow_preset(weights) -> dict:
    """The OpticalFlow preset: [0, 1] -> [-1, 1], and the smallest input [height, width] the weights take."""
    return {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "min_size": [int(x) for x in weights.meta["min_size"]]}


CLIP_PRESETS = {"VideoClassification": video_preset, "OpticalFlow": flow_preset}  # by transforms()'s class name
