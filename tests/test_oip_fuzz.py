"""schemathesis against the Open Inference Protocol's own OpenAPI description
(tests/data/open_inference_rest.yaml, from kserve/open-inference-protocol): no generated request
may get a 5xx, and every answer's status, content type and body must be the description's.
(Schemathesis's other default checks assume any schema-valid body is accepted; a served model
takes only its own inputs, and says so with a 400 the description allows.)"""

import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import (
    content_type_conformance, response_schema_conformance, status_code_conformance,
)

from helpers import REPO

SPEC = REPO / "tests" / "data" / "open_inference_rest.yaml"


def served_spec(models: list) -> dict:
    """The description with its `${NAME}` path templates written `{NAME}` (as OpenAPI means them)
    and the model names and versions the served ones."""
    spec = yaml.safe_load(SPEC.read_text())
    spec["paths"] = {path.replace("${", "{"): item for path, item in spec["paths"].items()}
    for item in spec["paths"].values():
        for parameter in item.get("parameters", []):
            parameter["schema"] = {"type": "string",
                                   "enum": models if parameter["name"] == "MODEL_NAME" else ["1.0"]}
    return spec


@pytest.fixture(scope="module")
def oip_cases():
    schema = schemathesis.openapi.from_dict(served_spec(["digits_net", "resnet18"]))
    return st.one_of(*(operation.as_strategy() for operation in
                       (result.ok() for result in schema.get_all_operations())))


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_oip_endpoints_never_answer_5xx_and_match_the_schema(server, oip_cases, data):
    case = data.draw(oip_cases)
    response = case.call(base_url=server.inference_url, timeout=30)
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
    assert response.status_code in (200, 400), (case.path, response.status_code, response.text[:300])
    case.validate_response(response, checks=[status_code_conformance, content_type_conformance,
                                             response_schema_conformance])
