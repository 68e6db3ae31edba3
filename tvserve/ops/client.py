"""A small HTTP client for a running tvserve: predictions and the management API.

Predictions are idempotent, so a prediction that meets a connection error, a 503 (queue full,
no worker yet) or TorchServe's 507 or 500 "Worker died." (the worker died under the request) is
retried with bounded exponential backoff, honouring the server's Retry-After (urllib3's Retry, in
a requests Session).
A read timeout is not retried: the server took the request and did not answer in time, and a
retry would wait as long again. With token authorization on, pass the key from the server's key
file (`read_keys(workdir)`).
"""

import json
import logging
import time
from pathlib import Path
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ReadTimeoutError
from urllib3.util.retry import Retry

from tvserve import TvserveError

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_MANAGEMENT_URL = "http://127.0.0.1:8081"
KEY_FILE = "key_file.json"  # written by TorchServe in its working directory when tokens are on
RANDOM_KEY = "TorchServe's random key, new at each start"  # a key no TVSERVE_KEYS_DIR file supplied
RETRIES = 4  # after the first try: 0.5 + 1 + 2 + 4 s of backoff at most
BACKOFF = 0.5  # s before the first retry, doubled each retry after it
MAX_WAIT = 10.0  # s, the most one Retry-After is honoured for
RETRY_STATUSES = (503, 507)
WORKER_DIED = "Worker died."  # TorchServe's message when a worker dies under a request (see worker_died)
RETRY_METHODS = Retry.DEFAULT_ALLOWED_METHODS | {"POST"}  # a prediction changes nothing on the server


def key_entries(workdir) -> dict:
    """{"inference": {"key", "expiration time"[, "source"]}, "management": {...}} from a server's key
    file; {} when tokens are off."""
    path = Path(workdir) / KEY_FILE
    if not path.exists():
        return {}
    entries = json.loads(path.read_text())
    return {api: entries[api] for api in ("inference", "management") if api in entries}


def read_keys(workdir) -> dict:
    """{"inference": key, "management": key} from a server's key file; {} when tokens are off."""
    return {api: entry["key"] for api, entry in key_entries(workdir).items()}


def key_sources(workdir) -> dict:
    """{"inference": where its key came from, "management": ...}: the file the frontend plugin read
    it from (TVSERVE_KEYS_DIR, tvserve/ops/plugin/SuppliedKeys.java), or TorchServe's own random key;
    {} when tokens are off. Never the keys themselves."""
    return {api: entry.get("source", RANDOM_KEY) for api, entry in key_entries(workdir).items()}


def bearer(token) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


def error_message(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500]
    return body.get("message", str(body)) if isinstance(body, dict) else str(body)


class LoggedRetry(Retry):
    """urllib3's Retry with this client's policy: a backoff of BACKOFF s before the first retry,
    doubled each retry after it; Retry-After honoured for at most MAX_WAIT s; read timeouts never
    retried; and one log line per retry that names its reason ("HTTP 503", or the connection error)."""

    def get_backoff_time(self) -> float:
        """Seconds before the next retry when the server sent no Retry-After."""
        return min(self.backoff_max, self.backoff_factor * 2 ** (len(self.history) - 1)) if self.history else 0.0

    def get_retry_after(self, response) -> float:
        """The server's Retry-After in seconds, capped at MAX_WAIT; None when it sent none."""
        seconds = super().get_retry_after(response)
        return None if seconds is None else min(seconds, MAX_WAIT)

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
        if isinstance(error, ReadTimeoutError):
            raise error  # taken and not answered in time: requests turns it into ReadTimeout
        return super().increment(method, url, response, error, _pool, _stacktrace)

    def sleep(self, response=None) -> None:
        """Logs the retry with its reason and waits: Retry-After when given, else the backoff."""
        retry_after = self.get_retry_after(response) if response is not None else None
        delay = retry_after or self.get_backoff_time()
        last = self.history[-1]
        reason = f"HTTP {last.status}" if last.status else f"connection error: {last.error}"
        log.info("retrying %s %s in %.1f s (%s)", last.method, last.url, delay, reason)
        time.sleep(delay)


def retry_policy(retries: int = RETRIES) -> LoggedRetry:
    """Up to `retries` retries of connection errors and RETRY_STATUSES; after the last, the last
    response is returned as it is (no exception)."""
    return LoggedRetry(total=retries, allowed_methods=RETRY_METHODS, status_forcelist=RETRY_STATUSES,
                       backoff_factor=BACKOFF, raise_on_status=False, respect_retry_after_header=True)


def with_retries(session: requests.Session, retries: int = RETRIES) -> requests.Session:
    """`session` with adapters that retry as `retry_policy(retries)` for http:// and https://
    (mounted once; the same session keeps its connections across calls). Returns `session`."""
    current = session.get_adapter("http://").max_retries
    if not (isinstance(current, LoggedRetry) and current.total == retries):
        adapter = HTTPAdapter(max_retries=retry_policy(retries))
        session.mount("http://", adapter)
        session.mount("https://", adapter)
    return session


def worker_died(response: requests.Response) -> bool:
    """A 500 with TorchServe's "Worker died.": it answers a request whose worker died with 507 when
    it has already seen the worker's exit code 137 (SIGKILL, out of memory), and with 500 when it
    has not (a race in its WorkerThread). The request is as safe to send again as after a 507."""
    return response.status_code == 500 and error_message(response) == WORKER_DIED


def post_with_retries(url: str, *, data: bytes, headers: dict, timeout: float, retries: int = RETRIES,
                      session=requests) -> requests.Response:
    """POSTs, retrying connection errors and RETRY_STATUSES (urllib3's Retry), and a 500 whose
    worker died (which Retry cannot tell from the status alone); returns the last response.
    `session` is a requests.Session (its adapters become retrying ones) or the requests module (a
    session for this call only). Raises requests.ConnectionError when no try connected, and
    requests.ReadTimeout, at once, when the server took the request but did not answer in `timeout` s."""
    own = not isinstance(session, requests.Session)
    http = with_retries(requests.Session() if own else session, retries)
    try:
        for attempt in range(retries + 1):
            response = http.post(url, data=data, headers=headers, timeout=timeout)
            if attempt == retries or not worker_died(response):
                return response
            delay = BACKOFF * 2**attempt
            log.info("retrying POST %s in %.1f s (HTTP 500: %s)", urlsplit(url).path, delay, WORKER_DIED)
            time.sleep(delay)
    finally:
        if own:
            http.close()


def predict(model: str, image, *, url: str = DEFAULT_URL, topk: int = None, version: str = None,
            token: str = None, timeout: float = 60, retries: int = RETRIES, session=requests, options: dict = None):
    """The answer for one image (a path or bytes): for a classifier its top-k,
    [{"label", "index", "probability"}, ...]; for the other tasks their answer (docs/models.md). `options`
    are the task's per-request options ({"threshold": 0.7}), sent as X-<name> headers.
    Pass a requests.Session as `session` to keep one connection across many predictions (its
    adapters are replaced by retrying ones). `timeout` is in seconds, for the connection and for
    the answer."""
    data = Path(image).read_bytes() if isinstance(image, (str, Path)) else image
    path = f"{url}/predictions/{model}" + (f"/{version}" if version else "")
    headers = {**bearer(token), **({"X-TopK": str(topk)} if topk is not None else {}),  # /predictions drops ?topk
               **{f"X-{name}": str(value) for name, value in (options or {}).items()}}
    try:
        response = post_with_retries(path, data=data, headers=headers, timeout=timeout, retries=retries,
                                     session=session)
    except requests.ReadTimeout:
        raise TvserveError(f"{model}: the server at {url} took the request but did not answer within {timeout:g} s. "
                           "It may be overloaded or the model slow: try again, or allow longer (--timeout).") from None
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
