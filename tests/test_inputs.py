"""Every real-world image in gets the plain RGB image's answer; every bad request a clear 4xx."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corpus import accepted_cases, encode, refused_cases
from handlers.images import open_image
from helpers import post_image

ACCEPTED = accepted_cases()
REFUSED = refused_cases()
RAW = [case for case in ACCEPTED if case.files is None and not case.name.startswith("json")]


@pytest.mark.parametrize("case", RAW, ids=lambda case: case.name)
def test_decoding_gives_the_equivalent_rgb_pixels(case):
    image = open_image(case.body)
    assert image.mode == "RGB" and image.size == case.reference.size
    assert np.array_equal(np.asarray(image), np.asarray(case.reference))


def send(server, model, case, session=requests):
    url = f"{server.inference_url}/predictions/{model}"
    return session.post(url, data=case.body, files=case.files, headers=case.headers, timeout=30)


@pytest.mark.parametrize("case", ACCEPTED, ids=lambda case: case.name)
def test_accepted_input_answers_like_the_plain_rgb_image(server, case):
    reference = post_image(server, "resnet18", encode(case.reference, "PNG"))
    response = send(server, "resnet18", case)
    assert response.status_code == 200, response.text
    assert [item["index"] for item in response.json()] == [item["index"] for item in reference.json()]
    for ours, theirs in zip(response.json(), reference.json()):
        assert ours["probability"] == pytest.approx(theirs["probability"], abs=1e-6)


@pytest.mark.parametrize("case", REFUSED, ids=lambda case: case.name)
def test_refused_input_gets_its_status_and_a_json_reason(server, case):
    response = send(server, "resnet18", case)
    assert response.status_code == case.status, response.text
    body = response.json()
    assert body["code"] == case.status and body["type"] == case.error_type
    assert len(body["message"]) > 10


def test_request_over_the_size_limit_gets_413(server):
    limit = int(server.properties["max_request_size"])
    response = post_image(server, "resnet18", b"\0" * (limit + 1024))
    assert response.status_code == 413


def test_bad_requests_in_a_batch_do_not_spoil_the_good_ones(server, digit_files):
    good = [(path.read_bytes(), label) for path, label in digit_files[:8]]
    expected = [post_image(server, "digits_net", data).json()[0]["index"] for data, _ in good]
    requests_ = [(data, 200) for data, _ in good] + [(b"not an image", 400)] * 4 + [(b"", 400)] * 4
    order = np.random.default_rng(0).permutation(len(requests_))
    mixed = [requests_[i] for i in order]
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda item: post_image(server, "digits_batched", item[0]), mixed))
    answers = iter(expected[i] for i in order if i < len(good))
    for (data, status), response in zip(mixed, responses):
        assert response.status_code == status, response.text
        if status == 200:
            assert response.json()[0]["index"] == next(answers)


def worker_process(server, model):
    description = requests.get(f"{server.management_url}/models/{model}", timeout=10).json()
    return psutil.Process(description[0]["workers"][0]["pid"])


def test_worker_survives_1000_bad_requests_without_growing(server):
    bad = [case for case in REFUSED if case.status == 400][:10]
    worker = worker_process(server, "digits_net")
    with requests.Session() as session:
        for case in bad * 10:  # warm-up: allocator pools reach their steady size
            send(server, "digits_net", case, session)
        rss_before = worker.memory_info().rss
        for case in bad * 100:
            assert send(server, "digits_net", case, session).status_code == case.status
    assert worker_process(server, "digits_net").pid == worker.pid
    growth = worker.memory_info().rss / rss_before - 1
    assert growth < 0.03, f"worker RSS grew {growth:.1%} over 1000 bad requests"


FUZZ_SESSION = requests.Session()
IMAGE_SEEDS = [encode(case.reference, "PNG") for case in ACCEPTED[:3]] + [ACCEPTED[11].body]


def mutate(data: bytes, edits) -> bytes:
    buffer = bytearray(data)
    for position, value in edits:
        if buffer:
            buffer[position % len(buffer)] = value
    return bytes(buffer)


bodies = st.one_of(
    st.binary(max_size=2048),
    st.builds(mutate, st.sampled_from(IMAGE_SEEDS),
              st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8)),
    st.builds(lambda data, cut: data[:cut], st.sampled_from(IMAGE_SEEDS), st.integers(0, 4000)),
)
printable = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20)
headers = st.dictionaries(st.sampled_from(["Content-Type", "X-TopK", "Accept", "X-Anything"]),
                          printable.map(str.strip))  # what HTTP allows in a header value
queries = st.dictionaries(st.sampled_from(["topk", "data", "x"]), printable, max_size=2)


@settings(max_examples=500, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(body=bodies, headers=headers, query=queries, legacy_path=st.booleans())
def test_fuzzed_requests_never_get_5xx_or_hang(server, body, headers, query, legacy_path):
    path = "/digits_net/predict" if legacy_path else "/predictions/digits_net"
    response = FUZZ_SESSION.post(f"{server.inference_url}{path}", params=query, data=body,
                                 headers=headers, timeout=10)
    assert response.status_code < 500, (response.status_code, response.text)
    assert response.status_code in (200, 400, 413, 415), response.text
