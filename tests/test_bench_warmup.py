"""`tvserve bench` loads each fresh server before its first point (tvserve/tools/bench.py warm_up), so
that its points measure a warm server: real wrk load on the session's real TorchServe."""

import time

from tvserve.tools.bench import BenchConfig, warm_up


def predictions(server, model: str) -> int:
    return server.log("access_log").count(f"/predictions/{model} ")


def settled_predictions(server, model: str) -> int:
    """The count once no line came for a second (within 30 s): requests wrk left in flight are
    answered after it stops."""
    count, deadline = predictions(server, model), time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = predictions(server, model)
        if now == count:
            break
        count = now
    return count


def test_warm_up_loads_the_server_before_its_points(server, digit_files):
    url = f"{server.inference_url}/predictions/digits_net"
    images = {"digit": [digit_files[0][0]], "other": [digit_files[1][0]]}
    before = settled_predictions(server, "digits_net")
    result = warm_up(url, images, BenchConfig(server_warmup=1.0, concurrency=(1, 3)))
    assert result["errors"] == 0 and result["requests"] > 3
    deadline = time.monotonic() + 10  # the access log is written as each answer goes out
    while predictions(server, "digits_net") - before < result["requests"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert predictions(server, "digits_net") - before >= result["requests"]


def test_no_warm_up_where_it_is_zero(server, digit_files):
    url = f"{server.inference_url}/predictions/digits_net"
    before = settled_predictions(server, "digits_net")
    assert warm_up(url, {"digit": [digit_files[0][0]]}, BenchConfig(server_warmup=0)) is None
    assert settled_predictions(server, "digits_net") == before
