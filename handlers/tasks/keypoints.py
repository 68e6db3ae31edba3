"""Keypoints (Keypoint R-CNN): detection's answer, and each person's named keypoints (COCO's 17,
from the weights' meta) with their positions in the image's pixels and the model's score:

    [{"label": "person", "index": 1, "score": 0.98, "box": [x1, y1, x2, y2],
      "keypoints": [{"name": "nose", "x": 212.4, "y": 80.1, "score": 9.7}, ...]}, ...]

A keypoint's score is Keypoint R-CNN's heatmap logit (not a probability: higher is surer, about
0 and below for keypoints it does not see).
"""

from handlers.tasks.detection import Detection


class Keypoints(Detection):
    name = "keypoints"
    parity_what = "boxes, scores or keypoints"

    def __init__(self, labels: list, keypoint_names: list = None):
        super().__init__(labels)
        if not keypoint_names:
            raise ValueError("A keypoints archive must record its keypoint names: rebuild it with `tvserve archive`.")
        self.keypoint_names = list(keypoint_names)

    @staticmethod
    def head_sizes(model) -> dict:
        return {"classes": model.roi_heads.box_predictor.cls_score.out_features,
                "keypoints": model.roi_heads.keypoint_predictor.kps_score_lowres.out_channels}

    def check_output(self, sizes: dict) -> None:
        super().check_output(sizes)
        if sizes["keypoints"] != len(self.keypoint_names):
            raise ValueError(f"The keypoint head predicts {sizes['keypoints']} keypoints, but "
                             f"{len(self.keypoint_names)} are named.")

    def item(self, output: dict, index: int, options: dict) -> dict:
        points, scores = output["keypoints"][index].tolist(), output["keypoints_scores"][index].tolist()
        return {**super().item(output, index, options),
                "keypoints": [{"name": name, "x": x, "y": y, "score": score}
                              for name, (x, y, _), score in zip(self.keypoint_names, points, scores)]}
