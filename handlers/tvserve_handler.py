"""tvserve's TorchServe handler: the archive's entry point, the same for every model.

Lifecycle, in the TorchServe worker:
- `initialize(context)` once: reads the archive's record (tvserve.json, handlers/record.py), sets
  its thread budget, checks the sha256 of the weights (or of the exported model), loads the
  recorded runtime (handlers/runtimes.py; eager on a GPU) in the archive's precision or the
  server's TVSERVE_PRECISION override (handlers/precision.py), on the CPU with elastic threads
  (handlers/elastic.py: half its threads while other workers' forwards hold the cores), and builds the task
  (handlers/tasks/), the preprocessing (handlers/devices.py) and its metrics (handlers/telemetry.py).
- `handle(data, context)` per batch, as a pipeline (handlers/pipeline.py): each request's protocol
  (handlers/protocols/: `/predictions` JSON, or OIP v2 / KServe v1 as tvserve's frontend plugin
  marks them) decodes it into images and options; every image goes to the prepare pool at once
  (handlers/devices.py: PIL image by image, or the opt-in tensor path, JPEGs decoded together on
  the worker's device, on the pool's threads; a client mistake gets its own 4xx, the rest of the
  batch still runs); the task makes one model input of the batch's prepared requests (stacked for
  classification, a list of images of their own sizes for detection) and runs the forward under
  `torch.inference_mode()`, then the task's answer per request, encoded by its protocol. Metadata
  requests are answered without a forward; explanations (handlers/explanations.py) run apart, on
  the eager model.
- The management API's `GET /models/NAME?customized=true` gets the archive's record.

Everything here imports torch, torchvision, PIL, the runtime's library and the files shipped in
the archive only. TorchServe wants exactly one class in this module.
"""

import contextlib
import json
import logging
import os
import time
from pathlib import Path

import torch

from handlers.budget import cores, prepare_threads, thread_budget
from handlers.devices import model_device, preprocessor_for
from handlers.elastic import TorchThreads, elastic, narrow_threads
from handlers.errors import RequestError
from handlers.explanations import Explainer
from handlers.models import load_model
from handlers.pipeline import Job, PreparePool
from handlers.precision import ENV as PRECISION_ENV, apply_precision, describe as describe_precision, serving_precision
from handlers.protocols import DEFAULT_PROTOCOL, PROTOCOLS, protocol_for
from handlers.protocols.common import header
from handlers.record import Backend, Record
from handlers.runtimes import get_runtime, load_runner, runtime_for, set_threads
from handlers.tasks import get_task
from handlers.telemetry import ARRIVAL_HEADER, Telemetry

log = logging.getLogger(__name__)


def load_backend(model_dir: Path, record: Record, threads: int, device: str, precision: str):
    """(runtime name, runner) of the archive's recorded backend (eager for records without one), or
    of the eager runtime that stands in for it on `device` in `precision` (runtimes.runtime_for),
    set up to run in `precision` (handlers/precision.py); on the CPU with elastic threads
    (handlers/elastic.py)."""
    backend = record.backend or Backend()
    name = runtime_for(backend.name, device, precision)
    runtime = get_runtime(name)
    if runtime.file is None:
        runner = load_runner(name, model=load_model(model_dir, record), device=device)
    else:
        path = backend.verified(model_dir)
        runner = load_runner(name, path=path, threads=threads)
    runner = apply_precision(runner, precision, device)
    if torch.device(device).type != "cpu":
        return name, runner
    narrow = narrow_threads(threads)
    if runtime.own_threads:  # a second session of the same file, on fewer threads
        def make_narrow():
            return apply_precision(load_runner(name, path=path, threads=narrow), precision, device)
    else:  # torch's threads, set around the forward
        def make_narrow():
            return TorchThreads(runner, narrow, threads)
    return name, elastic(runner, make_narrow, threads, cores())


@contextlib.contextmanager
def busy_marker():
    """A file that exists while this worker runs a batch, so that a graceful stop
    (tvserve/ops/stopping.py) waits for it. Only when the server names a folder for them."""
    folder = os.environ.get("TVSERVE_BUSY_DIR")
    marker = Path(folder) / str(os.getpid()) if folder else None
    if marker:
        marker.touch()
    try:
        yield
    finally:
        if marker:
            marker.unlink(missing_ok=True)


class TvserveHandler:
    """TorchServe entry point (the archive's only handler class)."""

    def __init__(self):
        self.initialized = False

    def initialize(self, context):
        model_dir = Path(context.system_properties["model_dir"])
        self.record = Record.read(model_dir)
        model_config = getattr(context, "model_yaml_config", None)
        threads = thread_budget(model_config, bool(self.record.sizing and self.record.sizing.shares_cores()))
        device = model_device(context.system_properties.get("gpu_id"))
        set_threads(threads)
        backend = self.record.backend or Backend()
        override = None if get_runtime(backend.name).engine else os.environ.get(PRECISION_ENV)  # int8 weights as they are
        self.precision = serving_precision(backend.precision, override)
        self.backend, self.runner = load_backend(model_dir, self.record, threads, device, self.precision)
        self.task = get_task(self.record.task, self.record.labels, self.record.keypoint_names)
        self.protocol = PROTOCOLS[DEFAULT_PROTOCOL]
        self.preprocessor = preprocessor_for(self.record.task, self.record.preset, device)
        self.prepare_pool = PreparePool(self.preprocessor, prepare_threads(model_config, threads))
        self.model_dir, self.explainer = model_dir, None  # the explainer is loaded on first use
        self.telemetry = Telemetry(context)
        self.telemetry.worker_started()
        self.initialized = True
        log.info("tvserve: loaded %s (%s), %d labels, backend %s on %s, %d threads (prepare pool %d), %s decoding, "
                 "precision %s", self.record.name, self.record.source, len(self.record.labels), self.backend, device,
                 threads, self.prepare_pool.threads, self.preprocessor.name, describe_precision(self.precision, device))

    def close(self) -> None:
        """Stops the prepare pool's threads and gives up the elastic runner's lock file: for a handler
        replaced in the same process (the archiver's measuring workers). TorchServe never calls it."""
        self.prepare_pool.close()
        if hasattr(self.runner, "close"):
            self.runner.close()

    def decode(self, protocol, request: dict, headers: dict) -> tuple:
        """One request -> (Decoded, [Tensor[3, H, W] float32 per image], options: the task's, and
        "image_size", the (height, width) of the upright image as sent; the tasks that read it answer
        one image per request).
        Raises RequestError for client mistakes; in a several-image request it names the image."""
        decoded, options = self.parse(protocol, request, headers)
        if decoded.action == "metadata":
            return decoded, [], {}
        return (decoded, *self.collect(self.preprocessor.prepare(decoded.images, self.telemetry.seconds), options))

    def parse(self, protocol, request: dict, headers: dict) -> tuple:
        """One request -> (Decoded: its action and encoded images, options: the task's), before any
        image is decoded. Raises RequestError for client mistakes."""
        if protocol.name not in self.task.protocols:
            routes = {"predictions": f"/predictions/{self.record.name}", "v2": "OIP v2 (/v2)", "v1": "KServe v1 (/v1)"}
            raise RequestError(400, "UnsupportedProtocol",
                               f"{self.record.name} is a {self.task.name} model: it answers on "
                               f"{' and '.join(routes[name] for name in self.task.protocols)} only.")
        decoded = protocol.decode(request, headers, self.task)
        if decoded.action == "explain" and not hasattr(self.task, "explain_target"):
            raise RequestError(400, "UnsupportedExplanation",
                               f"Explanations are for classification models; {self.record.name} is a {self.task.name} model.")
        if decoded.action == "explain" and get_runtime(self.backend).engine:
            raise RequestError(400, "UnsupportedExplanation",
                               f"{self.record.name} runs torchvision's int8 modules, which have no gradients to explain "
                               f"with: explain its fp32 counterpart instead.")
        if decoded.action == "metadata":
            return decoded, {}
        if hasattr(self.task, "inputs"):  # a clip, or a pair of images: one input of the model
            decoded.images = self.task.inputs(decoded.images)
        return decoded, self.task.parse_options(decoded.options)

    @staticmethod
    def collect(prepared: list, options: dict) -> tuple:
        """One request's prepared images (Preprocessing.prepare) -> ([Tensor[3, H, W]], options with
        "image_size" of its first image). Raises the first image's RequestError; in a several-image
        request it names the image."""
        for index, result in enumerate(prepared):
            if isinstance(result, RequestError):
                if len(prepared) == 1:
                    raise result
                raise RequestError(result.status, result.type, f"Image {index}: {result.message}")
        return [tensor for tensor, _ in prepared], {**options, "image_size": prepared[0][1]}

    def preprocess(self, request: dict, headers: dict):
        """One /predictions request -> (Tensor[3, H, W] float32, options: the task's, and
        "image_size", the (height, width) of the upright image as sent) (the bench's and tools' entry)."""
        _, tensors, options = self.decode(self.protocol, request, headers)
        return tensors[0], options

    def inference(self, batch):
        """The task's model input (classification: Tensor[N, 3, crop, crop]; detection and
        segmentation: a list of Tensor[3, H, W]) -> the task's scores for each image
        (classification: probabilities Tensor[N, n_labels]; detection: a dict per image)."""
        start = time.perf_counter()
        with torch.inference_mode():
            scores = self.task.scores(self.task.forward(self.runner, batch))
        self.telemetry.seconds("inference", time.perf_counter() - start)
        self.telemetry.batch(len(batch))
        return scores

    def explain(self, images: list, options: dict) -> list:
        """Preprocessed images -> one explanation each: the target class (the requested one, else the
        top-1) and its heatmap Tensor[h, w] in [0, 1] (handlers/explanations.py)."""
        if self.explainer is None:
            self.explainer = Explainer(load_model(self.model_dir, self.record), self.record.preset.crop)
        batch = torch.stack(images)
        targets = [self.task.explain_target(row, options) for row in self.inference(batch)]
        heatmaps, seconds = self.explainer(batch.cpu(), [target["index"] for target in targets])  # CPU model
        self.telemetry.seconds("explain", seconds)
        return [{"method": self.explainer.method, "target": target, "heatmap": heatmap}
                for target, heatmap in zip(targets, heatmaps)]

    def postprocess(self, scores: torch.Tensor, options: dict):
        return self.task.postprocess(scores, options)

    def handle(self, data, context):
        if context.get_request_header(0, "describe") == "True":  # GET /models/NAME?customized=true
            return [json.dumps(self.record.to_dict())]
        with busy_marker():
            try:
                return self.handle_batch(data, context)
            finally:
                self.telemetry.flush()  # the batch's metrics, in one write (handlers/telemetry.py)

    def respond(self, context, idx: int, body, content_type: str, headers: dict = None):
        context.set_response_content_type(idx, content_type)
        for key, value in (headers or {}).items():
            context.set_response_header(idx, key, value)
        return body

    def handle_batch(self, data, context):
        """The batch through the pipeline (handlers/pipeline.py): each request parsed with its protocol
        (mistakes and metadata answered at once), every image handed to the prepare pool at once,
        then the batch's prepared requests go through one forward, and each request's rows are
        encoded with its protocol. The forward waits for the whole batch, on a CPU as on a GPU: one
        forward of several images costs less per image than several of one (OpenVINO resnet18 on 2
        threads: 36-40 ms of CPU an image alone, 33 in batches of 2 to 8; a GPU's forward of 32 costs
        little more than one of 1), and on a CPU the decoding of the next batch runs beside this
        forward in a sibling worker where the measured sizing gives the model two workers sharing
        the cores (tvserve/archiving/measured_load.py). Explanations run apart. Every answer is
        counted by protocol, status and error type."""
        start = time.perf_counter()
        responses = [None] * len(data)
        jobs = self.parse_batch(data, context, responses, start)
        tickets = iter(self.prepare_pool.submit([image for job in jobs for image in job.decoded.images]))
        for job in jobs:
            job.tickets = [next(tickets) for _ in job.decoded.images]
        self.run_jobs(jobs, context, responses, start)
        return responses

    def parse_batch(self, data, context, responses: list, start: float) -> list:
        """The parse stage: a Job per request that needs its images, in the batch's order; client
        mistakes and metadata requests are answered into `responses` at once."""
        jobs = []
        for idx, request in enumerate(data):
            headers = context.get_all_request_header(idx)
            protocol = protocol_for(headers)
            self.telemetry.queued(header(headers, ARRIVAL_HEADER))
            try:
                decoded, options = self.parse(protocol, request, headers)
            except RequestError as err:
                responses[idx] = self.refuse(context, idx, protocol, err)
                continue
            if decoded.action == "metadata":
                responses[idx] = self.answer(context, idx, protocol, start, *protocol.metadata(decoded, self.task))
            else:
                jobs.append(Job(idx, protocol, decoded, options))
        return jobs

    def run_jobs(self, jobs: list, context, responses: list, start: float) -> None:
        """The forward and encode stages: each job's prepared images, in order, joined to one
        forward at the end of the batch; explanations and client mistakes are answered on their own."""
        prepared = []  # (job, images, options) waiting for the forward
        for job in jobs:
            results = [ticket.result() for ticket in job.tickets]
            self.report_timings(job.tickets)
            try:
                images, options = self.collect(results, job.options)
                if job.decoded.action == "explain":
                    responses[job.idx] = self.answer(context, job.idx, job.protocol, start,
                                                     *job.protocol.encode_explanation(job.decoded, self.explain(images, options)))
                else:
                    prepared.append((job, images, options))
            except RequestError as err:
                responses[job.idx] = self.refuse(context, job.idx, job.protocol, err)
        if prepared:
            self.forward_and_answer(context, prepared, responses, start)

    def report_timings(self, tickets: list) -> None:
        for ticket in tickets:
            for stage, seconds in ticket.timings():
                self.telemetry.seconds(stage, seconds)

    def forward_and_answer(self, context, prepared: list, responses: list, start: float) -> None:
        """One forward over every image of the `prepared` requests, then each request's answer."""
        scores = self.inference(self.task.batch([image for _, images, _ in prepared for image in images]))
        first = 0
        for job, images, options in prepared:
            rows = scores[first:first + len(images)]
            first += len(images)
            responses[job.idx] = self.answer(context, job.idx, job.protocol, start,
                                             *job.protocol.encode(job.decoded, self.task, rows, options))

    def refuse(self, context, idx: int, protocol, err: RequestError):
        """A client mistake's answer: its status and error body, counted."""
        context.set_response_status(err.status, err.type, idx=idx)
        self.telemetry.request(protocol.name, err.status, err.type)
        return self.respond(context, idx, *protocol.encode_error(err))

    def answer(self, context, idx: int, protocol, start: float, body, content_type: str, headers: dict):
        """A successful answer: counted, timed from the batch's start, and handed to TorchServe."""
        self.telemetry.request(protocol.name, 200)
        self.telemetry.seconds("request", time.perf_counter() - start)
        return self.respond(context, idx, body, content_type, headers)
