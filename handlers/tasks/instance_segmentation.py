"""Instance segmentation (Mask R-CNN): detection's answer, and each instance's mask in the image's
own size as COCO's compressed run-length encoding (what pycocotools' `mask.decode` reads):

    [{"label": "dog", "index": 18, "score": 0.97, "box": [x1, y1, x2, y2],
      "mask": {"size": [height, width], "counts": "<COCO RLE string>"}}, ...]

A pixel is in the mask where Mask R-CNN's mask probability is above 0.5 (MASK_THRESHOLD).
"""

import numpy as np
import torch

from handlers.tasks.detection import Detection, binary_masks


def rle_counts(mask: np.ndarray) -> list:
    """Bool array[H, W] -> run lengths in column-major order, starting with a run of zeros."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return [0, *runs] if flat.size and flat[0] else runs


def rle_encode(mask: np.ndarray) -> dict:
    """Bool array[H, W] -> {"size": [H, W], "counts": str}, COCO's compressed RLE (maskApi.c's
    rleToString: each count, less the count two before it, in 5-bit groups as characters from '0')."""
    counts, chars = rle_counts(mask), []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            chars.append(chr((c | 0x20 if more else c) + 48))
    return {"size": list(mask.shape), "counts": "".join(chars)}


def rle_decode(rle: dict) -> np.ndarray:
    """COCO's compressed RLE {"size": [H, W], "counts": str} -> bool array[H, W] (rleFrString)."""
    counts, text, position = [], rle["counts"].encode("ascii"), 0
    while position < len(text):
        x, shift, more = 0, 0, True
        while more:
            c = text[position] - 48
            x |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            position, shift = position + 1, shift + 5
            if not more and c & 0x10:
                x |= -1 << shift
        counts.append(x + counts[-2] if len(counts) > 2 else x)
    height, width = rle["size"]
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    if flat.size != height * width:
        raise ValueError(f"RLE counts cover {flat.size} pixels, not {height} x {width}.")
    return flat.reshape((height, width), order="F")


class InstanceSegmentation(Detection):
    name = "instance_segmentation"
    parity_what = "boxes, scores or masks"

    @staticmethod
    def head_sizes(model) -> dict:
        return {"classes": model.roi_heads.box_predictor.cls_score.out_features,
                "masks": model.roi_heads.mask_predictor.mask_fcn_logits.out_channels}

    def check_output(self, sizes: dict) -> None:
        super().check_output(sizes)
        if sizes["masks"] != len(self.labels):
            raise ValueError(f"The mask head predicts {sizes['masks']} classes, but there are {len(self.labels)} labels.")

    def postprocess(self, output: dict, options: dict) -> list:
        kept = self.kept(output, options)
        masks = binary_masks({"masks": output["masks"][kept]}).numpy()
        return [{**self.item(output, index, options), "mask": rle_encode(mask)}
                for index, mask in zip(kept.tolist(), masks)]


def masks_of(answer: list) -> torch.Tensor:
    """An answer's masks, decoded: Tensor[K, H, W] bool."""
    return torch.stack([torch.from_numpy(rle_decode(item["mask"])) for item in answer])
