"""Prometheus metrics on the metrics port, scraped and parsed with prometheus_client's parser:
counters move by exactly the requests sent (4xx included), histograms by the work done."""

import base64
import os
import signal
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from helpers import post_image

MODEL = "digits_net"


def scrape(server) -> dict:
    """{(sample name, frozenset of labels): value} of everything /metrics exposes."""
    text = requests.get(f"{server.metrics_url}/metrics", timeout=10).text
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def total(samples: dict, name: str, **labels) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when none exist yet)."""
    wanted = {(key, str(value)) for key, value in labels.items()}
    return sum(value for (sample, found), value in samples.items() if sample == name and wanted <= found)


def settled(server, check, timeout=15.0):
    """Scrapes until `check(samples)` holds (workers report through their log, a moment later)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(server)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def test_counters_move_by_exactly_the_requests_sent(server, digit_files):
    images = [path.read_bytes() for path, _ in digit_files[:3]]
    before = scrape(server)
    count = lambda samples, **labels: total(samples, "tvserve_requests_total", ModelName=MODEL, **labels)
    for data in images:
        assert post_image(server, MODEL, data).status_code == 200
    assert post_image(server, MODEL, b"").status_code == 400
    assert post_image(server, MODEL, b"not an image").status_code == 400
    oip = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                       "data": [base64.b64encode(data).decode() for data in images[:2]]}]}
    assert requests.post(f"{server.inference_url}/v2/models/{MODEL}/infer", json=oip, timeout=30).status_code == 200
    oip["inputs"][0]["datatype"] = "FP32"
    assert requests.post(f"{server.inference_url}/v2/models/{MODEL}/infer", json=oip, timeout=30).status_code == 400
    expected = {("predictions", 200, "none"): 3, ("predictions", 400, "EmptyBody"): 1,
                ("predictions", 400, "UnsupportedImage"): 1, ("v2", 200, "none"): 1, ("v2", 400, "InvalidTensor"): 1}
    moved = lambda samples: {key: count(samples, protocol=key[0], status=key[1], error_type=key[2])
                             - count(before, protocol=key[0], status=key[1], error_type=key[2]) for key in expected}
    after = settled(server, lambda samples: moved(samples) == expected)
    assert moved(after) == expected
    delta = lambda name: total(after, name, ModelName=MODEL) - total(before, name, ModelName=MODEL)
    assert delta("tvserve_decode_seconds_count") == 5  # 3 + 2 images decoded
    assert delta("tvserve_inference_seconds_count") == delta("tvserve_batch_images_count") == 4  # forwards run
    assert delta("tvserve_batch_images_sum") == 5  # images in them
    assert delta("tvserve_request_seconds_count") == 4  # answered 200
    assert delta("tvserve_queue_seconds_count") == 2  # the /v2 requests
    assert 0 < delta("tvserve_request_seconds_sum") < 60


def test_names_follow_prometheus_conventions(server):
    """Counters end in _total, histograms expose _bucket/_count/_sum, gauges take none of those suffixes."""
    text = requests.get(f"{server.metrics_url}/metrics", timeout=10).text
    families = [family for family in text_string_to_metric_families(text) if family.name.startswith("tvserve_")]
    names = {sample.name for family in families for sample in family.samples}
    assert {"tvserve_requests_total", "tvserve_worker_starts_total", "tvserve_inference_seconds_bucket"} <= names
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "gauge": ("",)}
    for family in families:
        assert family.type in suffixes, (family.name, family.type)
        for sample in family.samples:
            assert sample.name.endswith(suffixes[family.type]), (sample.name, family.type)
            if family.type == "gauge":
                assert not sample.name.endswith(("_total", "_bucket", "_count", "_sum")), sample.name


def test_a_worker_restart_is_counted(server):
    starts = lambda samples: total(samples, "tvserve_worker_starts_total", ModelName=MODEL)
    before = starts(scrape(server))
    worker = requests.get(f"{server.management_url}/models/{MODEL}", timeout=10).json()[0]["workers"][0]["pid"]
    os.kill(worker, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready = requests.get(f"{server.inference_url}/v2/models/{MODEL}/ready", timeout=10)
        if ready.status_code == 200 and starts(scrape(server)) == before + 1:
            break
        time.sleep(0.5)
    assert starts(scrape(server)) == before + 1
    assert post_image(server, MODEL, b"").status_code == 400  # and it serves again


def test_requests_the_frontend_refuses_are_counted_apart(server):
    rejected = lambda samples: total(samples, "tvserve_frontend_rejections_total", protocol="v2", status=404)
    before = rejected(scrape(server))
    for path in ("no_such_model/infer", f"{MODEL}/versions/9.9/infer"):
        response = requests.post(f"{server.inference_url}/v2/models/{path}", json={"inputs": []}, timeout=30)
        assert response.status_code == 404
    assert rejected(scrape(server)) == before + 2
