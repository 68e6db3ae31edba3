"""The worker's pipeline: a pool of threads decodes and preprocesses a batch's images at once, then
one forward takes them all, and the decoding of the next batch runs beside it in a sibling worker.

    parse (the worker's thread, request by request: protocol, options, client mistakes)
      -> prepare (PreparePool: `threads` threads; PIL image by image, the tensor path in chunks)
      -> forward (the worker's thread: every prepared request of the batch, in order, in one call)
      -> encode (the worker's thread: each request's answer)

PIL's decoders and resizes, torch's tensor ops, ONNX Runtime and OpenVINO release the GIL while they
work, so the pool's threads decode on every core at once. TorchServe hands the worker its batch of
queued requests (model-config.yaml's batchSize; with a 1 ms maxBatchDelay nothing waits for
batch-mates). The forward waits for the whole batch: one forward of several images costs less per
image than several of one (handlers/tvserve_handler.py handle_batch). What overlaps a worker's
decoding with a forward is a second worker: the archiver's measured sizing tries two workers that
each have every core (tvserve/archiving/measured_load.py), so that while one decodes its batch the
other's forward has the cores, and keeps it where it serves the most at load. When both forwards
do run at once, the one that starts second runs on half its threads (handlers/elastic.py).
Why not TorchServe's asynchronous worker mode, which takes requests as they arrive: its frontend
(AsyncWorkerThread, AsyncBatchAggregator in TorchServe 0.12) enforces no response timeout, does not
requeue the requests a killed worker held, and hands the worker every queued request at once, so
the job queue's 503 under overload never comes; and its Python side deep-copies the context and
prints a line for every request (ts/async_service.py).
"""

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field


@dataclass
class Job:
    """One request on its way through the pipeline: where its answer goes, its protocol, what it
    decoded to, its options and, once submitted, its images' Tickets."""

    idx: int
    protocol: object
    decoded: object
    options: dict
    tickets: list = field(default_factory=list)


class Ticket:
    """One image's place in a submitted chunk: result() waits for it."""

    def __init__(self, future: Future, offset: int):
        self.future, self.offset = future, offset

    def result(self):
        """(Tensor[3, H, W] float32, (height, width)) or the image's RequestError (Preprocessing.prepare)."""
        return self.future.result()[0][self.offset]

    def timings(self) -> list:
        """[(stage, seconds)] of the whole chunk from its first image's ticket, none from the others,
        so that each chunk is reported once, by the worker's thread (which owns the metrics cache)."""
        return self.future.result()[1] if self.offset == 0 else []


class PreparePool:
    """The prepare stage: `preprocessor.prepare` on `threads` threads (inline where 1, or where the
    batch is one chunk: a lone request at low load), chunk by
    chunk. A chunk is one image for a preprocessor that works image by image (PIL), and the batch
    shared evenly among the threads for one that decodes a list together (`batched`: nvJPEG)."""

    def __init__(self, preprocessor, threads: int):
        self.preprocessor = preprocessor
        self.threads = max(1, threads)
        self.executor = ThreadPoolExecutor(self.threads, thread_name_prefix="tvserve-prepare") \
            if self.threads > 1 else None

    def close(self) -> None:
        """Stops the pool's threads once their work is done (a handler replaced in the same process)."""
        if self.executor is not None:
            self.executor.shutdown()

    def chunk_size(self, images: int) -> int:
        return max(1, math.ceil(images / self.threads)) if self.preprocessor.batched else 1

    def submit(self, images: list) -> list:
        """One Ticket per image, in order; the work starts at once on the pool's threads."""
        size = self.chunk_size(len(images))
        chunks = [images[first:first + size] for first in range(0, len(images), size)]
        inline = len(chunks) == 1  # nothing to overlap it with: a hop to the pool would only add its wait
        return [Ticket(future, offset) for chunk in chunks for future in [self.run(chunk, inline)]
                for offset in range(len(chunk))]

    def run(self, chunk: list, inline: bool = False) -> Future:
        if self.executor is not None and not inline:
            return self.executor.submit(self.prepare, chunk)
        future = Future()
        future.set_result(self.prepare(chunk))
        return future

    def prepare(self, chunk: list) -> tuple:
        """(the chunk's prepared images, [(stage, seconds)] to report: see Ticket.timings)."""
        timings = []
        return self.preprocessor.prepare(chunk, lambda stage, seconds: timings.append((stage, seconds))), timings

