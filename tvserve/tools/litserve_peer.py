"""LitServe 0.2.19 serving a tvserve archive's classifier: the bench's `litserve` system. Runs in its
own process (tvserve/tools/peers.py starts it), and imports LitServe, which tvserve does not need.

It serves what the archive holds, read through the modules the worker uses, so the two cannot
drift: the record's model built and given the archive's verified weights file (handlers/models.py),
eager PyTorch in eval mode under torch.inference_mode(); the record's preset applied by the worker's
PIL path (handlers/devices.py's PilPreprocessing: decode, EXIF upright, RGB, resize, crop,
normalise); the classification task's answer (handlers/tasks/classification.py): the top 5 labels
with their softmax probabilities, [{"label", "index", "probability"}, ...], as tvserve answers.

LitServe's contract, one hook per job: setup() once per worker process, then decode_request() ->
batch() -> predict() -> unbatch() -> encode_response(). The request body is the encoded image, as
tvserve's /predictions takes it, so wrk posts the same file to both.

    python -m tvserve.tools.litserve_peer .tvserve/bench/unpacked/net/tvserve --port 8123 --workers 2 --batch 4
"""

import argparse
import logging
from pathlib import Path
from typing import Annotated

import litserve as ls
import torch
from fastapi import Body

from handlers.budget import cores_per_worker
from handlers.devices import PilPreprocessing
from handlers.errors import RequestError
from handlers.models import load_model
from handlers.record import Record
from handlers.tasks.classification import Classification

BATCH_TIMEOUT = 0.01  # s a worker waits to fill a batch (LitServe's examples use 0.01 to 0.1)


class ArchiveClassifier(ls.LitAPI):
    """The classifier of the unpacked archive `model_dir`, eager, `threads` torch threads per worker."""

    def __init__(self, model_dir: str, threads: int, **kwargs):
        super().__init__(**kwargs)
        self.model_dir, self.threads = model_dir, threads

    def setup(self, device):
        torch.set_num_threads(self.threads)
        record = Record.read(self.model_dir)
        if record.task != "classification":
            raise ValueError(f"The LitServe peer serves classifiers; {record.name} is a {record.task} model.")
        self.model = load_model(Path(self.model_dir), record)  # the archive's verified weights, eval mode
        self.preprocessing = PilPreprocessing(record.preset)  # the worker's exact PIL path
        self.task = Classification(record.labels)
        self.topk = self.task.parse_topk(None)  # tvserve's default answer: the top 5

    def decode_request(self, request: Annotated[bytes, Body(media_type="application/octet-stream")]):
        """The request's body, an encoded image -> Tensor[3, crop, crop] float32; a bad image is a 4xx."""
        try:
            return self.preprocessing(request)
        except RequestError as err:
            raise ls.HTTPException(status_code=err.status, detail=err.message) from None

    def batch(self, inputs):
        return torch.stack(inputs)  # Tensor[N, 3, crop, crop]

    def predict(self, x):
        """Tensor[N, 3, crop, crop] -> probabilities Tensor[N, n_labels]; at max_batch_size 1 LitServe
        skips batch() and unbatch(): Tensor[3, crop, crop] -> Tensor[n_labels]."""
        batched = self.max_batch_size > 1
        with torch.inference_mode():
            scores = self.task.scores(self.model(x if batched else x.unsqueeze(0)))
        return scores if batched else scores[0]

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output):
        return self.task.postprocess(output, {"topk": self.topk})


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="LitServe serving a tvserve archive's classifier (the bench's peer)",
                                     epilog="Example: python -m tvserve.tools.litserve_peer "
                                            ".tvserve/bench/unpacked/net/tvserve --port 8123 --workers 2 --batch 4")
    parser.add_argument("model_dir", help="an unpacked tvserve archive (its tvserve.json, model file and weights)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1, help="inference worker processes")
    parser.add_argument("--batch", type=int, default=1, help="LitServe's max_batch_size")
    parser.add_argument("--batch-timeout", type=float, default=BATCH_TIMEOUT, help="s a worker waits to fill a batch")
    parser.add_argument("--threads", type=int, help="torch threads per worker (default: cores // workers, as "
                        "tvserve's workers share them; TVSERVE_CPUS sets the cores)")
    return parser


def main(args) -> None:
    threads = args.threads or cores_per_worker(args.workers)
    api = ArchiveClassifier(args.model_dir, threads, max_batch_size=args.batch,
                            batch_timeout=args.batch_timeout if args.batch > 1 else 0.0)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers, timeout=60)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
