"""The same corpus against TorchServe's stock `image_classifier` handler, side by side.

The stock server runs TorchServe's defaults (only the ports moved to free loopback ones and token
auth off), with resnet18 archived the stock way: torch-model-archiver, a one-class model file, the
state_dict and an index_to_name.json. The table goes to the test's output and to
`stock_comparison.md` in the session's work folder.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import torchvision

from corpus import accepted_cases, refused_cases
from tvserve.server import Server, free_port, write_properties

STOCK_MODEL_FILE = '''
from torchvision.models.resnet import BasicBlock, ResNet


class ResNet18(ResNet):
    def __init__(self):
        super().__init__(BasicBlock, [2, 2, 2, 2])
'''


@pytest.fixture(scope="module")
def stock_server(work, resnet18_weights):
    folder = work / "stock"
    store = folder / "model_store"
    store.mkdir(parents=True)
    (folder / "model.py").write_text(STOCK_MODEL_FILE)
    categories = torchvision.models.ResNet18_Weights.DEFAULT.meta["categories"]
    (folder / "index_to_name.json").write_text(json.dumps({str(i): name for i, name in enumerate(categories)}))
    subprocess.run([
        str(Path(sys.executable).with_name("torch-model-archiver")), "--model-name", "resnet18",
        "--version", "1.0", "--model-file", folder / "model.py", "--serialized-file", resnet18_weights,
        "--handler", "image_classifier", "--extra-files", folder / "index_to_name.json",
        "--export-path", store,
    ], check=True)
    config = write_properties(folder / "config.properties", {
        "inference_address": f"http://127.0.0.1:{free_port()}",
        "management_address": f"http://127.0.0.1:{free_port()}",
        "metrics_address": f"http://127.0.0.1:{free_port()}",
        "grpc_inference_port": free_port(), "grpc_management_port": free_port(),
        "disable_token_authorization": "true", "default_workers_per_model": 1,
    })
    with Server(model_store=store, config=config, workdir=folder / "server") as server:
        yield server


def status_of(server, model, case):
    url = f"{server.inference_url}/predictions/{model}"
    try:
        response = requests.post(url, data=case.body, files=case.files, headers=case.headers, timeout=30)
    except requests.Timeout:
        return "timeout"
    return response.status_code


def test_status_codes_side_by_side_with_stock_handler(server, stock_server, work):
    cases = accepted_cases() + refused_cases()
    rows = [(case.name, case.status, status_of(server, "resnet18", case), status_of(stock_server, "resnet18", case))
            for case in cases]
    table = ["| case | expected | tvserve | stock image_classifier |", "| --- | --- | --- | --- |"]
    table += [f"| {name} | {expected} | {ours} | {theirs} |" for name, expected, ours, theirs in rows]
    stock_right = sum(expected == theirs for _, expected, _, theirs in rows)
    table.append(f"\ntvserve as expected: {sum(e == o for _, e, o, _ in rows)}/{len(rows)}; "
                 f"stock as expected: {stock_right}/{len(rows)}")
    (work / "stock_comparison.md").write_text("\n".join(table) + "\n")
    print("\n" + "\n".join(table))
    assert [ours for _, _, ours, _ in rows] == [expected for _, expected, _, _ in rows]
