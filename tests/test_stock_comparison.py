"""The same corpus against TorchServe's stock `image_classifier` handler, side by side.

The stock server runs TorchServe's defaults (only the ports moved to free loopback ones and token
auth off), with resnet18 archived the stock way: torch-model-archiver, a one-class model file, the
state_dict and an index_to_name.json. The table goes to the test's output and to
`stock_comparison.md` in the session's work folder.
"""

import pytest
import requests
import torchvision

from corpus import accepted_cases, refused_cases
from tvserve.ops.server import Server
from tvserve.tools.stock import archive_stock_resnet18, stock_config


@pytest.fixture(scope="module")
def stock_server(work, resnet18_weights):
    folder = work / "stock"
    store = archive_stock_resnet18(folder, resnet18_weights, torchvision.models.ResNet18_Weights.DEFAULT.meta["categories"])
    config = stock_config(folder / "config.properties", workers=1)
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
