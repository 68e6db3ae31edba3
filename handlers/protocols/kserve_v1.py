"""KServe's v1 protocol, as tvserve's frontend plugin forwards it (`tvserve-protocol: v1`):
`POST /v1/models/M:predict` with {"instances": [{"b64": "<image>"}, ...], "parameters": {"topk": k}}
answers {"predictions": [<the task's answer per image>, ...]}; `:explain` answers
{"explanations": [{"method", "target", "shape", "heatmap"}, ...]}; errors are {"error": "..."}."""

from handlers.errors import RequestError
from handlers.protocols.common import (
    ACTION_HEADER, JSON, Decoded, body_bytes, compact, explanation_json, header, json_payload, strict_base64,
)


def instance_image(instance, index: int) -> bytes:
    if not isinstance(instance, dict) or set(instance) != {"b64"}:
        raise RequestError(400, "InvalidBody", f'Instance {index} must be {{"b64": "<base64 image>"}}.')
    return strict_base64(instance["b64"], f"Instance {index}'s b64")


class KServeV1:
    name = "v1"

    def decode(self, request: dict, headers: dict, task) -> Decoded:
        payload = json_payload(body_bytes(request))
        instances = payload.get("instances") if isinstance(payload, dict) else None
        if not isinstance(instances, list) or not instances:
            raise RequestError(400, "InvalidBody",
                               'The body must be {"instances": [{"b64": "<base64 image>"}, ...]} with at least one.')
        parameters = payload.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise RequestError(400, "InvalidBody", '"parameters" must be an object, e.g. {"topk": 3}.')
        options = {name: None if parameters.get(name) is None else str(parameters[name]) for name in task.option_names}
        images = [instance_image(instance, i) for i, instance in enumerate(instances)]
        return Decoded(images, options, header(headers, ACTION_HEADER) or "infer")

    def encode(self, decoded: Decoded, task, scores, options: dict) -> tuple:
        return compact({"predictions": [task.postprocess(row, options) for row in scores]}), JSON, {}

    def encode_explanation(self, decoded: Decoded, explanations: list) -> tuple:
        return compact({"explanations": [explanation_json(explanation) for explanation in explanations]}), JSON, {}

    def encode_error(self, error: RequestError) -> tuple:
        return compact({"error": error.message}), JSON
