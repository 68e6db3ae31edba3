"""What each protocol costs per request against /predictions, on a running server: the same image
sent sequentially (one client, one connection) the same number of times each way, interleaved in
rounds so that drift in the machine's load hits every protocol alike.

    python -m tvserve.tools.protocol_cost --url http://127.0.0.1:8080 --model digits_net IMAGE [-n 300]

Prints each way's median and mean latency and its ratio to /predictions, then an explanation's
size and time on each explanation route.
"""

import argparse
import base64
import json
import statistics
import struct
import time

import requests


def ways(url: str, model: str, image: bytes) -> dict:
    """{name: (path, body, headers)}: one request per protocol, each asking for the top-5."""
    b64 = base64.b64encode(image).decode()
    oip_json = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}],
                "parameters": {"topk": 5}}
    head = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": len(image) + 4}}],
                       "parameters": {"topk": 5, "binary_data_output": True}}).encode()
    return {
        "/predictions (raw body)": (f"{url}/predictions/{model}", image, {}),
        "OIP v2, JSON base64": (f"{url}/v2/models/{model}/infer", json.dumps(oip_json).encode(),
                                {"Content-Type": "application/json"}),
        "OIP v2, binary tensors": (f"{url}/v2/models/{model}/infer", head + struct.pack("<I", len(image)) + image,
                                   {"Inference-Header-Content-Length": str(len(head)),
                                    "Content-Type": "application/octet-stream"}),
        "KServe v1": (f"{url}/v1/models/{model}:predict",
                      json.dumps({"instances": [{"b64": b64}], "parameters": {"topk": 5}}).encode(),
                      {"Content-Type": "application/json"}),
    }


def timed(session, path, body, headers) -> float:
    start = time.perf_counter()
    response = session.post(path, data=body, headers=headers, timeout=60)
    elapsed = time.perf_counter() - start
    if response.status_code != 200:
        raise SystemExit(f"{path} answered {response.status_code}: {response.text[:200]}")
    return elapsed


def measure(url: str, model: str, image: bytes, n: int, rounds: int = 10) -> dict:
    """{way: [seconds per request]}: `n` requests each, in `rounds` interleaved rounds after a warm-up."""
    session, table = requests.Session(), ways(url, model, image)
    for request in table.values():
        for _ in range(10):
            timed(session, *request)
    times = {name: [] for name in table}
    for _ in range(rounds):
        for name, request in table.items():
            times[name] += [timed(session, *request) for _ in range(max(n // rounds, 1))]
    return times


def explanation_cost(url: str, model: str, image: bytes) -> list:
    """[(route, answer bytes, seconds)] for one explanation on each route (after one warm-up)."""
    b64 = base64.b64encode(image).decode()
    routes = [("/explanations", f"{url}/explanations/{model}", image, {}),
              ("/v1 :explain", f"{url}/v1/models/{model}:explain", json.dumps({"instances": [{"b64": b64}]}), {}),
              ("/v2 explain", f"{url}/v2/models/{model}/explain",
               json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}]}), {})]
    rows = []
    for name, path, body, headers in routes:
        requests.post(path, data=body, headers=headers, timeout=120)
        start = time.perf_counter()
        response = requests.post(path, data=body, headers=headers, timeout=120)
        rows.append((name, len(response.content), time.perf_counter() - start))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image")
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--model", default="digits_net")
    parser.add_argument("-n", type=int, default=300, help="requests per protocol")
    args = parser.parse_args(argv)
    image = open(args.image, "rb").read()
    times = measure(args.url, args.model, image, args.n)
    base = statistics.median(times["/predictions (raw body)"])
    print(f"{args.model}, {len(image)} B image, {args.n} sequential requests per protocol")
    print(f"{'protocol':26} {'median ms':>10} {'mean ms':>8} {'ratio (median)':>15}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:26} {median * 1000:10.2f} {statistics.mean(values) * 1000:8.2f} {median / base:15.2f}")
    for name, size, seconds in explanation_cost(args.url, args.model, image):
        print(f"explanation via {name:14} {size:6d} B {seconds * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
