"""The worker's pipeline: while the forward runs on the requests already prepared, a pool of threads
decodes and preprocesses the next ones, so that a worker never waits on itself.

    parse (the worker's thread, request by request: protocol, options, client mistakes)
      -> prepare (PreparePool: `threads` threads; PIL image by image, the tensor path in chunks)
      -> forward (the worker's thread: every prepared request that is ready, in the batch's order,
         in one call, while the pool goes on with the rest)
      -> encode (the worker's thread: each request's answer as soon as its forward is done)

PIL's decoders and resizes, torch's tensor ops, ONNX Runtime and OpenVINO release the GIL while they
work, so the stages run at once in one process. TorchServe hands the worker its batch of queued
requests (model-config.yaml's batchSize; with a 1 ms maxBatchDelay nothing waits for batch-mates):
the worker overlaps the decoding of the batch's later requests with the forward of its earlier ones.
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
    """One image's place in a submitted chunk: done() without waiting, result() waits for it."""

    def __init__(self, future: Future, offset: int):
        self.future, self.offset = future, offset

    def done(self) -> bool:
        return self.future.done()

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


def ready(tickets: list) -> bool:
    """Whether every image behind `tickets` is prepared (checked without waiting)."""
    return all(ticket.done() for ticket in tickets)
