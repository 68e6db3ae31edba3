"""What TorchServe's management API says about the models it serves: versions, workers, queues,
and readiness (every model's workers READY, which `/ping` does not tell)."""

import requests

from tvserve.ops.client import bearer


def model_versions(management_url: str, token: str = None) -> dict:
    """{model name: the management API's description of each of its versions}."""
    headers = bearer(token)
    listing = requests.get(f"{management_url}/models", headers=headers, timeout=5)
    listing.raise_for_status()
    return {
        entry["modelName"]: requests.get(f"{management_url}/models/{entry['modelName']}/all",
                                         headers=headers, timeout=5).json()
        for entry in listing.json().get("models", [])
    }


def pending_requests(management_url: str, token: str = None) -> dict:
    """{model name: requests waiting in its job queues}."""
    return {name: sum(v.get("jobQueueStatus", {}).get("pendingRequests", 0) for v in versions)
            for name, versions in model_versions(management_url, token).items()}


def model_status(management_url: str, token: str = None) -> dict:
    """{model name: (READY workers, workers wanted)} over all its versions."""
    return {
        name: (sum(1 for v in versions for w in v.get("workers", []) if w.get("status") == "READY"),
               sum(max(1, int(v.get("minWorkers", 1))) for v in versions))
        for name, versions in model_versions(management_url, token).items()
    }


def readiness(management_url: str, token: str = None) -> tuple:
    """(ready?, one line): ready only when at least one model is registered and every model has
    all its workers READY."""
    try:
        status = model_status(management_url, token)
    except (requests.RequestException, ValueError) as err:
        return False, f"management API at {management_url} does not answer: {err}"
    if not status:
        return False, "no model is registered"
    waiting = {name: counts for name, counts in status.items() if counts[0] < counts[1]}
    if waiting:
        return False, "not ready: " + ", ".join(f"{name} {r}/{w} workers READY" for name, (r, w) in waiting.items())
    return True, "ready: " + ", ".join(f"{name} {r}/{w}" for name, (r, w) in status.items())
