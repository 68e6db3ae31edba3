"""Writes inferenceservice-v1beta1.schema.json: the openAPIV3Schema of KServe's InferenceService
CRD (version v1beta1), without its descriptions (a third of the size; validation does not read them).

    python deploy/kserve/schema/extract.py serving.kserve.io_inferenceservices.yaml

The CRD file is config/crd/full/serving.kserve.io_inferenceservices.yaml of github.com/kserve/kserve
at the tag named in SOURCE.md.
"""

import json
import sys
from pathlib import Path

import yaml

OUT = Path(__file__).with_name("inferenceservice-v1beta1.schema.json")


def without_descriptions(node):
    if isinstance(node, dict):
        return {key: without_descriptions(value) for key, value in node.items() if key != "description"}
    if isinstance(node, list):
        return [without_descriptions(item) for item in node]
    return node


def main(crd_file: str) -> None:
    crd = yaml.safe_load(Path(crd_file).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1beta1")
    schema = without_descriptions(version["schema"]["openAPIV3Schema"])
    OUT.write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv[1])
