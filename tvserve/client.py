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


def management(method: str, path: str, *, management_url: str, timeout: float = 120, **params):
    """One management API call; returns its JSON, or raises TvserveError with the server's reason."""
    try:
        response = requests.request(method, f"{management_url}{path}", params=params or None, timeout=timeout)
    except requests.ConnectionError:
        raise TvserveError(f"No management API answers at {management_url}.") from None
    if response.status_code != 200:
        raise TvserveError(f"{method} {path}: HTTP {response.status_code}: {error_message(response)}")
    return response.json()


def describe_model(model: str, *, management_url: str = DEFAULT_MANAGEMENT_URL) -> list:
    """Every served version of `model`: the management API's description, with the archive's
    metadata (tvserve.json) under "customizedMetadata"."""
    versions = management("GET", f"/models/{model}/all", management_url=management_url)
    return [
        management("GET", f"/models/{model}/{v['modelVersion']}", management_url=management_url,
                   customized="true")[0]
        for v in versions
    ]


def register(archive: str, *, management_url: str = DEFAULT_MANAGEMENT_URL, workers: int = 1) -> dict:
    """Loads `archive` (a file name in the server's model store) and waits for its workers."""
    return management("POST", "/models", management_url=management_url, url=archive,
                      initial_workers=workers, synchronous="true")


def set_default_version(model: str, version: str, *, management_url: str = DEFAULT_MANAGEMENT_URL) -> dict:
    return management("PUT", f"/models/{model}/{version}/set-default", management_url=management_url)


def unregister(model: str, version: str, *, management_url: str = DEFAULT_MANAGEMENT_URL) -> dict:
    return management("DELETE", f"/models/{model}/{version}", management_url=management_url)
