"""What a model's output means, one module per task. A task has
    check_output(output)                 archive time, on the meta device: the head fits the labels
    meta_example(preset), meta_forward(model, example)
                                         the meta-device input, and the part of the forward that runs there
    option_names, parse_options(raw)     per request: validated options (e.g. topk, threshold)
    batch(tensors), forward(runner, batch)
                                         how preprocessed images become one model input (stacked, or a
                                         list of images of their own sizes) and its raw outputs
    scores(outputs)                      per image, what the answer is made of (e.g. probabilities)
    postprocess(scores, options)         one image's scores -> the answer (JSON-serialisable); options
                                         also carry "image_size", the (height, width) of the image as sent
    parity_gap(a, b), PARITY_TOLERANCE   what "answers the same" means when a runtime is compared to eager
    inputs(items)                        (optional) a request's items -> what the model answers one each:
                                         a video model's one clip, a flow model's one pair of images
and is built as Task(labels, keypoint_names).
"""

from handlers.tasks.classification import Classification
from handlers.tasks.detection import Detection
from handlers.tasks.instance_segmentation import InstanceSegmentation
from handlers.tasks.keypoints import Keypoints
from handlers.tasks.optical_flow import OpticalFlow
from handlers.tasks.semantic_segmentation import SemanticSegmentation
from handlers.tasks.video_classification import VideoClassification

TASKS = {task.name: task for task in (Classification, Detection, InstanceSegmentation, Keypoints,
                                      SemanticSegmentation, VideoClassification, OpticalFlow)}
STACKED = (Classification.name,)  # tasks whose model takes one stacked Tensor[N, 3, crop, crop]


def get_task(name: str, labels: list, keypoint_names: list = None):
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}: this archive needs a newer tvserve ({', '.join(TASKS)} known).")
    return TASKS[name](labels, keypoint_names)
