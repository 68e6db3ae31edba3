"""A small HTTP client for a running tvserve: predictions and model descriptions."""

from pathlib import Path

import requests

from tvserve import TvserveError

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_MANAGEMENT_URL = "http://127.0.0.1:8081"


def error_message(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500]
    return body.get("message", str(body)) if isinstance(body, dict) else str(body)


def predict(model: str, image, *, url: str = DEFAULT_URL, topk: int = None, version: str = None,
            timeout: float = 60) -> list:
    """Top-k of one image (a path or bytes): [{"label", "index", "probability"}, ...]."""
    data = Path(image).read_bytes() if isinstance(image, (str, Path)) else image
    path = f"{url}/predictions/{model}" + (f"/{version}" if version else "")
    headers = {"X-TopK": str(topk)} if topk is not None else None  # /predictions drops query strings
    try:
        response = requests.post(path, data=data, headers=headers, timeout=timeout)
    except requests.ConnectionError:
        raise TvserveError(f"No server answers at {url}. Start one with `make serve` or `tvserve serve`.") from None
    if response.status_code != 200:
        raise TvserveError(f"{model}: HTTP {response.status_code}: {error_message(response)}")
    return response.json()


def describe_model(model: str, *, management_url: str = DEFAULT_MANAGEMENT_URL) -> list:
    """The management API's description of every version of a served model."""
    try:
        response = requests.get(f"{management_url}/models/{model}/all", timeout=10)
    except requests.ConnectionError:
        raise TvserveError(f"No management API answers at {management_url}.") from None
    if response.status_code != 200:
        raise TvserveError(f"{model}: HTTP {response.status_code}: {error_message(response)}")
    return response.json()
