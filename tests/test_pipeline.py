"""The worker's pipeline (handlers/pipeline.py), in-process with the worker's own code: a batch's
images are prepared on the pool's threads at once and go through one forward, every request gets the
answer it would get alone, and a client mistake stays with its own request."""

import json
import threading

import pytest

from handlers.budget import PREPARE_THREADS_ENV, prepare_threads
from handlers.tasks.classification import PARITY_TOLERANCE
from tvserve.tools.batches import batch_context
from tvserve.tools.inprocess import load_handler, probabilities

HELD_S = 60  # the most the held image waits for the first forward: far above any machine's need


@pytest.fixture
def handler(model_store, tmp_path):
    return load_handler(model_store / "digits_batched.mar", tmp_path / "unpacked", threads=2)


def answers(handler, bodies: list) -> tuple:
    """(status, answer) per request of one batch through the worker's entry point."""
    context = batch_context(handler, len(bodies))
    bodies_out = handler.handle([{"body": bytearray(body)} for body in bodies], context)
    return [(processor.get_response_status_code(), json.loads(body) if isinstance(body, (str, bytes)) else body)
            for processor, body in zip(context.request_processor, bodies_out)]


def test_each_request_of_a_pipelined_batch_gets_its_answer_alone(handler, digit_files):
    bodies = [path.read_bytes() for path, _ in digit_files[:6]]
    bodies.insert(3, b"not an image")
    served = answers(handler, bodies)
    assert handler.prepare_pool.threads == 2
    assert served[3][0] == 400 and "image" in json.dumps(served[3][1]).lower()
    for (status, answer), body in zip(served[:3] + served[4:], bodies[:3] + bodies[4:]):
        alone = probabilities(handler, body)
        assert status == 200
        for row in answer:
            assert abs(row["probability"] - alone[row["index"]].item()) <= PARITY_TOLERANCE


def test_a_batch_is_prepared_on_the_pool_s_threads_at_once_then_one_forward(handler, digit_files):
    """The batch's first image is held until the second one's preparation has begun (a worker that
    prepared image by image would hold it for HELD_S and fail here); then one forward takes every
    image the batch could use, a corrupt one left out."""
    bodies = [path.read_bytes() for path, _ in digit_files[:4]] + [b"not an image"]
    second_began, waited, forwards = threading.Event(), [], []
    prepare, inference = handler.preprocessor.prepare, handler.inference

    def held_prepare(images, seconds=None):
        if images[0] == bodies[1]:
            second_began.set()
        if images[0] == bodies[0]:
            waited.append(second_began.wait(HELD_S))
        return prepare(images, seconds)

    def counted_inference(batch):
        forwards.append(len(batch))
        return inference(batch)

    handler.preprocessor.prepare, handler.inference = held_prepare, counted_inference
    served = answers(handler, bodies)
    assert waited == [True]
    assert forwards == [4]
    assert [status for status, _ in served] == [200] * 4 + [400]


def test_prepare_threads_come_from_the_config_then_the_environment_then_the_torch_threads(monkeypatch):
    monkeypatch.delenv(PREPARE_THREADS_ENV, raising=False)
    assert prepare_threads({}, 2) == 2
    monkeypatch.setenv(PREPARE_THREADS_ENV, "3")
    assert prepare_threads({"handler": {"threads": 1}}, 1) == 3
    assert prepare_threads({"handler": {"prepare_threads": 4}}, 1) == 4
