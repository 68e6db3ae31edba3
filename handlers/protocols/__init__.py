"""Wire formats: how a request carries images and options, and how answers and errors go back.

A protocol has
    decode(request, headers, option_names) -> (image bytes, {option: raw text or None})
    encode(answer) -> (JSON-serialisable body, content type)
    encode_error(RequestError) -> (body, content type)
and knows nothing of the task (handlers/tasks/), which turns outputs into answers. Today's
`/predictions` JSON is the first; a second (e.g. the Open Inference Protocol) is one new module
registered here.
"""

from handlers.protocols.predictions import PredictionsJSON

PROTOCOLS = {protocol.name: protocol for protocol in (PredictionsJSON(),)}
DEFAULT_PROTOCOL = PredictionsJSON.name
