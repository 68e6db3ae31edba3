"""Small HTTP helpers for tests against the live server."""

import requests


def post_image(server, model, data=None, *, headers=None, files=None, timeout=30):
    """POSTs to /predictions/MODEL: a raw body `data`, or multipart `files`. Returns the response."""
    url = f"{server.inference_url}/predictions/{model}"
    return requests.post(url, data=data, files=files, headers=headers, timeout=timeout)
