"""A small HTTP client for a running tvserve: predictions and the management API.

Predictions are idempotent, so a prediction that meets a connection error, a 503 (queue full,
no worker yet) or TorchServe's 507 (the worker died under the request) is retried with bounded
exponential backoff, honouring the server's Retry-After. With token authorization on, pass the key from the server's key file
(`read_keys(workdir)`).
"""

import json
import logging
import time
from pathlib import Path

import requests

from tvserve import TvserveError

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_MANAGEMENT_URL = "http://127.0.0.1:8081"
KEY_FILE = "key_file.json"  # written by TorchServe in its working directory when tokens are on
RETRIES = 4  # after the first try: 0.5 + 1 + 2 + 4 s of backoff at most
BACKOFF = 0.5  # s, doubled each retry
MAX_WAIT = 10.0  # s, the most one Retry-After is honoured for
RETRY_STATUSES = (503, 507)


def read_keys(workdir) -> dict:
    """{"inference": key, "management": key} from a server's key file; {} when tokens are off."""
    path = Path(workdir) / KEY_FILE
    if not path.exists():
        return {}
    keys = json.loads(path.read_text())
    return {api: keys[api]["key"] for api in ("inference", "management") if api in keys}


def bearer(token) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


def error_message(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500]
    return body.get("message", str(body)) if isinstance(body, dict) else str(body)


def retry_delay(response, attempt: int) -> float:
    """Seconds to wait before retry `attempt` (0-based): Retry-After when the server sent one."""
    retry_after = response.headers.get("Retry-After") if response is not None else None
    if retry_after and retry_after.strip().isdigit():
        return min(float(retry_after), MAX_WAIT)
    return BACKOFF * 2**attempt


def post_with_retries(url: str, *, data: bytes, headers: dict, timeout: float, retries: int = RETRIES,
                      session=requests) -> requests.Response:
    """POSTs, retrying connection errors and RETRY_STATUSES; returns the last response."""
    for attempt in range(retries + 1):
        response = None
        try:
            response = session.post(url, data=data, headers=headers, timeout=timeout)
            if response.status_code not in RETRY_STATUSES:
                return response
        except requests.ConnectionError:
            if attempt == retries:
                raise
        if attempt < retries:
            delay = retry_delay(response, attempt)
            log.info("retrying %s in %.1f s (%s)", url, delay, response.status_code if response else "no connection")
            time.sleep(delay)
    return response


def predict(model: str, image, *, url: str = DEFAULT_URL, topk: int = None, version: str = None,
            token: str = None, timeout: float = 60, retries: int = RETRIES, session=requests, options: dict = None):
    """The answer for one image (a path or bytes): for a classifier its top-k,
    [{"label", "index", "probability"}, ...]; for the other tasks their answer (README). `options`
    are the task's per-request options ({"threshold": 0.7}), sent as X-<name> headers.
    Pass a requests.Session as `session` to keep one connection across many predictions."""
    data = Path(image).read_bytes() if isinstance(image, (str, Path)) else image
    path = f"{url}/predictions/{model}" + (f"/{version}" if version else "")
    headers = {**bearer(token), **({"X-TopK": str(topk)} if topk is not None else {}),  # /predictions drops ?topk
               **{f"X-{name}": str(value) for name, value in (options or {}).items()}}
    try:
        response = post_with_retries(path, data=data, headers=headers, timeout=timeout, retries=retries,
                                     session=session)
    except requests.ConnectionError:
        raise TvserveError(f"No server answers at {url}. Start one with `make serve` or `tvserve serve`.") from None
    if response.status_code != 200:
        raise TvserveError(f"{model}: HTTP {response.status_code}: {error_message(response)}")
    return response.json()


def management(method: str, path: str, *, management_url: str, token: str = None, timeout: float = 120,
               **params):
    """One management API call; returns its JSON, or raises TvserveError with the server's reason."""
    try:
        response = requests.request(method, f"{management_url}{path}", params=params or None,
                                    headers=bearer(token), timeout=timeout)
    except requests.ConnectionError:
        raise TvserveError(f"No management API answers at {management_url}.") from None
    if response.status_code != 200:
        raise TvserveError(f"{method} {path}: HTTP {response.status_code}: {error_message(response)}")
    return response.json()


def describe_model(model: str, *, management_url: str = DEFAULT_MANAGEMENT_URL, token: str = None) -> list:
    """Every served version of `model`: the management API's description, with the archive's
    metadata (tvserve.json) under "customizedMetadata"."""
    versions = management("GET", f"/models/{model}/all", management_url=management_url, token=token)
    return [
        management("GET", f"/models/{model}/{v['modelVersion']}", management_url=management_url,
                   token=token, customized="true")[0]
        for v in versions
    ]


def register(archive: str, *, management_url: str = DEFAULT_MANAGEMENT_URL, workers: int = 1,
             token: str = None) -> dict:
    """Loads `archive` (a file name in the server's model store) and waits for its workers."""
    return management("POST", "/models", management_url=management_url, token=token, url=archive,
                      initial_workers=workers, synchronous="true")


def set_default_version(model: str, version: str, *, management_url: str = DEFAULT_MANAGEMENT_URL,
                        token: str = None) -> dict:
    return management("PUT", f"/models/{model}/{version}/set-default", management_url=management_url, token=token)


def unregister(model: str, version: str, *, management_url: str = DEFAULT_MANAGEMENT_URL, token: str = None) -> dict:
    return management("DELETE", f"/models/{model}/{version}", management_url=management_url, token=token)
