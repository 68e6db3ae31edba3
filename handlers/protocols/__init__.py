"""Wire formats: how a request carries images and options, and how answers and errors go back.

A protocol has
    decode(request, headers, task) -> Decoded (common.py): images, raw options, action, reply state
    encode(decoded, task, scores Tensor[N, ...], options) -> (body, content type, response headers)
    encode_error(RequestError) -> (body, content type)
    metadata(decoded, task) -> (body, content type, headers)      where it answers metadata requests
and uses only the task's generic interface (option_names, postprocess, tensors, output_metadata),
never a particular task. The handler picks the protocol per request from the `tvserve-protocol`
header that tvserve's frontend plugin (tvserve/ops/plugin/) sets on /v2 and /v1 requests;
`/predictions` (no such header) gets tvserve's own JSON. A new protocol is one module registered here.
"""

from handlers.protocols.common import PROTOCOL_HEADER, header
from handlers.protocols.kserve_v1 import KServeV1
from handlers.protocols.open_inference import OpenInference
from handlers.protocols.predictions import PredictionsJSON

PROTOCOLS = {protocol.name: protocol for protocol in (PredictionsJSON(), OpenInference(), KServeV1())}
DEFAULT_PROTOCOL = PredictionsJSON.name


def protocol_for(headers: dict):
    """The protocol a request came in on (tvserve's /predictions JSON unless the plugin says otherwise)."""
    return PROTOCOLS.get(header(headers, PROTOCOL_HEADER) or DEFAULT_PROTOCOL, PROTOCOLS[DEFAULT_PROTOCOL])
