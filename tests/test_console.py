"""The console (tvserve/console/, served by tvserve/ops/plugin/ConsoleEndpoint.java) in a real browser:
Debian's chromium driven by Selenium through chromium-driver, against the session's real TorchServe
(digits_net, digits_batched, resnet18) and a detection, a video and an optical-flow model with random
weights registered on it."""

import base64
import json
import shutil
import tempfile

import numpy as np
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from conftest import FLOW, VIDEO
from helpers import CHROMEDRIVER, CHROMIUM, REPO, chrome_options, registered_torchvision
from handlers.tasks.instance_segmentation import rle_encode
from tvserve.archiving.mar import read_record
from tvserve.archiving.options import ArchiveOptions
from tvserve.archiving.sources import archive_torchvision
from tvserve.ops import client
from tvserve.ops.properties import free_ports_config, read_properties, write_properties
from tvserve.ops.server import CONSOLE_ADDRESS_PROPERTY, Server
from tvserve.tools.tasks_latency import detecting_weights  # random weights that detect something

DETECTOR = "fasterrcnn_mobilenet_v3_large_320_fpn"
SAMPLES = REPO / "samples"
WAIT_S = 60  # a bound far above what any machine needs for one answer of these models


@pytest.fixture(scope="module")
def browser():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    if missing:
        pytest.fail(f"The console tests need Debian's chromium and chromium-driver ({', '.join(missing)} missing): "
                    "apt-get install chromium chromium-driver (.ci/run installs them).")
    profile = tempfile.mkdtemp(prefix="tvserve-chromium-")
    driver = webdriver.Chrome(options=chrome_options(profile), service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def detector(server, model_store, work):
    """The detector with random weights that detect something, archived (eager, one worker) and
    registered on the session's server for this module."""
    name = "console_detector"  # its own name: tests/test_tasks.py archives DETECTOR into the same store
    weights = detecting_weights(DETECTOR, work / f"{DETECTOR}-console.pth", work)
    archive_torchvision(DETECTOR, weights_file=weights, options=ArchiveOptions(
        model_name=name, export_path=model_store, backend="eager", workers=1, batch_size=1, max_batch_delay=1,
        startup_timeout=300))
    client.register(f"{name}.mar", management_url=server.management_url)
    yield name
    client.unregister(name, "1.0", management_url=server.management_url)


@pytest.fixture(scope="module")
def moving(server, model_store, video_weights, flow_weights):
    """r3d_18 and raft_small with random weights (eager, one worker, batches of one) registered on the
    session's server for this module: {task: model name}. Names of their own: tests/test_video_flow.py
    registers r3d_18 and raft_small from the same store."""
    names = {task: f"console_{name}" for task, name in (("video_classification", VIDEO), ("optical_flow", FLOW))}
    options = {"backend": "eager", "batch_size": 1, "max_batch_delay": 1}
    with registered_torchvision(server, model_store, VIDEO, video_weights, model_name=names["video_classification"],
                                **options), \
            registered_torchvision(server, model_store, FLOW, flow_weights, model_name=names["optical_flow"], **options):
        yield names


def open_console(browser, server, query: str = ""):
    browser.get(f"{server.inference_url}/console/{query}")
    WebDriverWait(browser, WAIT_S).until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"))
    browser.get_log("browser")  # what loading logged is checked by test_the_page_loads_without_console_errors


def severe_logs(browser) -> list:
    return [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def choose(browser, model: str) -> None:
    Select(browser.find_element(By.ID, "model")).select_by_value(model)


def wait_answer(browser, model: str, before: str = None) -> str:
    """The status line once the page has the answer of `model` (a line other than `before`)."""
    status = browser.find_element(By.ID, "status")
    WebDriverWait(browser, WAIT_S).until(
        lambda b: f"from /predictions/{model}" in status.text and status.text != before)
    return status.text


def samples_shown(browser) -> list:
    return [button.get_attribute("data-sample") for button in browser.find_elements(By.CSS_SELECTOR, "#samples button")]


def natural_size(browser, image) -> list:
    """[height, width] of an <img>'s picture, once loaded."""
    WebDriverWait(browser, WAIT_S).until(lambda b: b.execute_script("return arguments[0].complete", image))
    return browser.execute_script("return [arguments[0].naturalHeight, arguments[0].naturalWidth]", image)


def raw_answer(browser):
    return json.loads(browser.find_element(By.ID, "answer").text)


def management_models(server) -> set:
    """{(name, version, READY?)} from the management API."""
    found = set()
    for entry in client.management("GET", "/models", management_url=server.management_url)["models"]:
        for version in client.management("GET", f"/models/{entry['modelName']}/all", management_url=server.management_url):
            workers = version["workers"]
            ready = bool(workers) and all(w["status"] == "READY" for w in workers)
            found.add((version["modelName"], version["modelVersion"], ready))
    return found


def test_the_page_loads_without_console_errors(browser, server):
    browser.get(f"{server.inference_url}/console/")
    WebDriverWait(browser, WAIT_S).until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"))
    assert browser.title == "tvserve console"
    assert severe_logs(browser) == []


def test_model_list_matches_the_management_api(browser, server, model_store, detector):
    open_console(browser, server)
    rows = browser.find_elements(By.CSS_SELECTOR, "#models tbody tr")
    shown = {(row.get_attribute("data-model"), row.get_attribute("data-version"),
              row.find_element(By.CSS_SELECTOR, ".state").text == "READY") for row in rows}
    assert shown == management_models(server)
    for row in rows:  # each row's task and backend are its archive's record
        name = row.get_attribute("data-model")
        record = read_record(model_store / f"{name}.mar")
        assert row.find_element(By.CSS_SELECTOR, ".task").text == record.task
        assert row.find_element(By.CSS_SELECTOR, ".backend").text.startswith(record.backend.name)
    assert severe_logs(browser) == []


@pytest.mark.parametrize("how", ["sample button", "file picker", "drop"])
def test_a_digit_sample_gives_its_digit_on_the_page(browser, server, how):
    sample = {"sample button": "7-dark-on-white.png", "file picker": "3-dark-on-white-thin-pen.png",
              "drop": "0-light-on-dark.png"}[how]
    open_console(browser, server)
    choose(browser, "digits_net")
    if how == "sample button":
        browser.find_element(By.CSS_SELECTOR, f'#samples button[data-sample="{sample}"]').click()
    elif how == "file picker":
        browser.find_element(By.ID, "file").send_keys(str(SAMPLES / sample))
    else:
        drop(browser, SAMPLES / sample)
    wait_answer(browser, "digits_net")
    bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
    assert bars[0].get_attribute("data-label") == sample[0]
    direct = requests.post(f"{server.inference_url}/predictions/digits_net", data=(SAMPLES / sample).read_bytes(),
                           headers={"X-TopK": "5"}, timeout=60).json()
    shown = raw_answer(browser)
    assert [item["label"] for item in shown] == [item["label"] for item in direct]
    assert [item["probability"] for item in shown] == pytest.approx([item["probability"] for item in direct], abs=1e-5)
    assert len(bars) == len(direct) == 5
    assert severe_logs(browser) == []


def test_an_explanation_draws_its_heatmap(browser, server):
    open_console(browser, server)
    choose(browser, "digits_net")
    browser.find_element(By.ID, "explain").click()
    browser.find_element(By.CSS_SELECTOR, '#samples button[data-sample="7-dark-on-white.png"]').click()
    figure = browser.find_element(By.ID, "heatmap-figure")
    WebDriverWait(browser, WAIT_S).until(lambda b: figure.is_displayed())
    direct = requests.post(f"{server.inference_url}/explanations/digits_net",
                           data=(SAMPLES / "7-dark-on-white.png").read_bytes(), timeout=60).json()
    canvas = browser.find_element(By.ID, "heatmap")
    assert [int(canvas.get_attribute("height")), int(canvas.get_attribute("width"))] == direct["shape"]
    assert f"{direct['method']}, class {direct['target']['label']}:" in figure.text
    assert severe_logs(browser) == []

def test_the_pages_mask_decoder_reads_the_handlers_coco_rle(browser, server):
    """Masks are drawn from the answer's COCO RLE: the page's decoder (rleCounts) gives back, pixel for
    pixel, a mask the handler encoded (a random one: no detector needed)."""
    mask = np.zeros((37, 53), bool)
    mask[5:30, 10:40] = np.random.default_rng(0).random((25, 30)) > 0.3
    encoded = rle_encode(mask)
    open_console(browser, server)
    runs = browser.execute_script("return rleCounts(arguments[0])", encoded["counts"])
    flat = np.repeat(np.arange(len(runs)) % 2 == 1, runs)  # runs alternate from a run of zeros, column-major
    assert np.array_equal(flat.reshape(mask.shape, order="F"), mask)

def drop(browser, path) -> None:
    """Drops the file at `path` on the drop zone as a browser does: a drop event whose DataTransfer holds it."""
    browser.execute_script("""
        const [name, bytes] = [arguments[0], Uint8Array.from(atob(arguments[1]), c => c.charCodeAt(0))];
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: "image/png"}));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true}));
    """, path.name, base64.b64encode(path.read_bytes()).decode())


def test_a_detector_draws_its_boxes(browser, server, detector):
    open_console(browser, server)
    choose(browser, detector)
    threshold = browser.find_element(By.ID, "threshold")
    threshold.clear()
    threshold.send_keys("0.2")
    browser.find_element(By.CSS_SELECTOR, '#samples button[data-sample="photo.jpg"]').click()
    wait_answer(browser, detector)
    direct = requests.post(f"{server.inference_url}/predictions/{detector}", data=(SAMPLES / "photo.jpg").read_bytes(),
                           headers={"X-Threshold": "0.2"}, timeout=120).json()
    boxes = browser.find_elements(By.CSS_SELECTOR, "#overlay rect.box")
    assert len(direct) > 0, "the detecting weights found nothing in samples/photo.jpg"
    assert len(boxes) == len(raw_answer(browser)) == len(direct)
    assert [box.get_attribute("data-label") for box in boxes] == [item["label"] for item in direct]
    first = boxes[0]
    assert [float(first.get_attribute(a)) for a in ("x", "y")] == pytest.approx(direct[0]["box"][:2], abs=0.01)
    assert severe_logs(browser) == []


def test_a_corrupt_file_shows_the_services_400(browser, server, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes((SAMPLES / "7-dark-on-white.png").read_bytes()[:60])
    direct = requests.post(f"{server.inference_url}/predictions/digits_net", data=corrupt.read_bytes(), timeout=60)
    assert direct.status_code == 400
    open_console(browser, server)
    choose(browser, "digits_net")
    browser.find_element(By.ID, "file").send_keys(str(corrupt))
    wait_answer(browser, "digits_net")
    error = browser.find_element(By.ID, "error")
    body = direct.json()
    assert error.is_displayed()
    assert error.text == f"HTTP 400 {body['type']}: {body['message']}"
    assert raw_answer(browser) == body
    logged = severe_logs(browser)  # the browser's own line for a 4xx, and nothing else
    assert all("/predictions/digits_net" in entry["message"] and "400" in entry["message"] for entry in logged), logged


def requests_by_status(server, model: str) -> dict:
    """{status: count} of tvserve_requests_total for `model`, from the metrics port."""
    counts = {}
    for family in text_string_to_metric_families(requests.get(f"{server.metrics_url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == "tvserve_requests_total" and sample.labels.get("ModelName") == model:
                key = (sample.labels["status"], sample.labels["error_type"])
                counts[key] = counts.get(key, 0) + sample.value
    return counts


def test_live_figures_count_the_requests_the_service_answered(browser, server):
    open_console(browser, server, "?every=1000")
    sample = (SAMPLES / "5-dark-on-white.png").read_bytes()
    for data in [sample] * 4 + [sample[:60]]:
        requests.post(f"{server.inference_url}/predictions/digits_net", data=data, timeout=60)
    counts = requests_by_status(server, "digits_net")
    row = "#live tbody tr[data-model='digits_net']"
    WebDriverWait(browser, WAIT_S).until(lambda b: b.find_elements(By.CSS_SELECTOR, f"{row} .requests") and b.find_element(
        By.CSS_SELECTOR, f"{row} .requests").text == f"{sum(counts.values()):g}")
    errors = ", ".join(f"{status} {kind}: {n:g}" for (status, kind), n in sorted(counts.items()) if int(status) >= 400)
    assert errors and browser.find_element(By.CSS_SELECTOR, f"{row} .errors").text == errors
    WebDriverWait(browser, WAIT_S).until(lambda b: b.find_element(By.CSS_SELECTOR, f"{row} .rate").text != "—")
    assert float(browser.find_element(By.CSS_SELECTOR, f"{row} .rate").text) >= 0
    assert severe_logs(browser) == []


@pytest.fixture(scope="module")
def with_tokens(work, model_store):
    """The production configuration (tokens on, the console at its own address) serving digits_net,
    every address on a free loopback port."""
    folder = work / "console-tokens"
    store = folder / "model_store"
    store.mkdir(parents=True)
    shutil.copy(model_store / "digits_net.mar", store)
    config = free_ports_config(REPO / "config.production.properties", folder / "config.properties")
    properties = read_properties(config)
    loopback = {key: value.replace("0.0.0.0", "127.0.0.1") for key, value in properties.items()
                if key in ("inference_address", CONSOLE_ADDRESS_PROPERTY)}
    write_properties(config, {**properties, **loopback})
    with Server(model_store=store, config=config, workdir=folder / "server") as server:
        yield server


def test_with_tokens_the_page_asks_for_the_inference_key_and_keeps_it_in_the_tab(browser, with_tokens):
    key = with_tokens.keys()["inference"]
    assert with_tokens.console_url == f"{with_tokens.console_address}/console/" != f"{with_tokens.inference_url}/console/"
    browser.get(with_tokens.console_url)
    try:
        dialog = browser.find_element(By.ID, "key-dialog")
        WebDriverWait(browser, WAIT_S).until(lambda b: dialog.is_displayed())
        assert browser.find_elements(By.CSS_SELECTOR, "#models tbody tr") == []
        browser.find_element(By.ID, "key").send_keys(key)
        browser.find_element(By.ID, "key-save").click()
        WebDriverWait(browser, WAIT_S).until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"))
        rows = browser.find_elements(By.CSS_SELECTOR, "#models tbody tr")
        assert [row.get_attribute("data-model") for row in rows] == ["digits_net"]
        browser.find_element(By.CSS_SELECTOR, '#samples button[data-sample="7-dark-on-white.png"]').click()
        wait_answer(browser, "digits_net")
        assert browser.find_element(By.CSS_SELECTOR, "#bars .bar").get_attribute("data-label") == "7"
        stored = browser.execute_script("return [sessionStorage.getItem('tvserve-inference-key'), "
                                        "localStorage.length, document.cookie]")
        assert stored == [key, 0, ""]
        assert browser.get_cookies() == []
        logged = severe_logs(browser)  # the browser's own lines for the refused first calls, and nothing else
        assert logged and all("400" in entry["message"] for entry in logged), logged
    finally:
        browser.execute_script("sessionStorage.clear()")


@pytest.mark.parametrize("path", ["/console/", "/console/console.js", "/console/console.css",
                                  "/console/samples/7-dark-on-white.png"])
def test_the_console_address_serves_the_pages_files_with_no_key(with_tokens, path):
    response = requests.get(f"{with_tokens.console_address}{path}", timeout=10)
    assert response.status_code == 200
    page = requests.get(f"{with_tokens.inference_url}{path}", headers=client.bearer(with_tokens.keys()["inference"]),
                        timeout=10)
    assert (response.headers["Content-Type"], response.content) == (page.headers["Content-Type"], page.content)


@pytest.mark.parametrize("method, path", [("GET", "/console/api/models"), ("GET", "/console/api/metrics"),
                                          ("POST", "/predictions/digits_net"), ("POST", "/v2/models/digits_net/infer")])
def test_the_console_address_relays_the_rest_and_torchserve_checks_the_key(with_tokens, method, path):
    """Without the key, TorchServe's own refusal comes back through the console address, as the
    inference port gives it; with it, the answer (a 400 for an image sent to /v2 as raw bytes is an answer)."""
    image = (SAMPLES / "7-dark-on-white.png").read_bytes() if method == "POST" else None
    key = client.bearer(with_tokens.keys()["inference"])
    relayed, direct = (requests.request(method, f"{url}{path}", data=image, timeout=60)
                       for url in (with_tokens.console_address, with_tokens.inference_url))
    assert relayed.status_code == direct.status_code and relayed.status_code in (400, 401)
    assert relayed.text == direct.text and "Token Authorization failed" in relayed.text
    relayed, direct = (requests.request(method, f"{url}{path}", data=image, headers={**key, "X-TopK": "2"}, timeout=60)
                       for url in (with_tokens.console_address, with_tokens.inference_url))
    assert relayed.status_code == direct.status_code
    assert relayed.headers["Content-Type"] == direct.headers["Content-Type"]
    if path == "/predictions/digits_net":
        assert relayed.status_code == 200 and relayed.json() == direct.json() and len(relayed.json()) == 2
    elif path == "/console/api/models":
        assert relayed.status_code == 200 and [m["name"] for m in relayed.json()["models"]] == ["digits_net"]


def test_a_clip_sample_gives_bars_and_its_windows(browser, server, moving):
    model = moving["video_classification"]
    open_console(browser, server)
    choose(browser, model)
    assert "video/*" in browser.find_element(By.ID, "file").get_attribute("accept")
    assert samples_shown(browser) == ["pan.mp4"]
    browser.find_element(By.CSS_SELECTOR, '#samples button[data-sample="pan.mp4"]').click()
    wait_answer(browser, model)
    answer = raw_answer(browser)
    bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
    assert len(bars) == len(answer["predictions"]) == 5
    assert [bar.get_attribute("data-label") for bar in bars] == [item["label"] for item in answer["predictions"]]
    legend = browser.find_element(By.ID, "legend")
    assert legend.get_attribute("data-windows") == str(answer["windows"])
    assert legend.text.startswith(f"{answer['windows']} window{'' if answer['windows'] == 1 else 's'} "
                                  f"over {answer['frames']} frames")
    clip = browser.find_element(By.ID, "clip")
    assert clip.is_displayed() and not browser.find_element(By.ID, "picture").is_displayed()
    assert browser.execute_script("return [arguments[0].muted, arguments[0].controls]", clip) == [True, True]
    assert severe_logs(browser) == []


def test_a_flow_pair_sample_shows_the_flow_at_the_frames_size(browser, server, moving):
    model = moving["optical_flow"]
    open_console(browser, server)
    choose(browser, model)
    assert samples_shown(browser) == ["pan-1.png + pan-2.png"]
    browser.find_element(By.CSS_SELECTOR, '#samples button[data-sample="pan-1.png + pan-2.png"]').click()
    wait_answer(browser, model)
    with Image.open(SAMPLES / "pan-1.png") as first:
        sent = [first.height, first.width]
    assert raw_answer(browser)["size"] == sent
    assert browser.find_element(By.ID, "flow-figure").is_displayed()
    assert natural_size(browser, browser.find_element(By.ID, "flow")) == sent
    assert natural_size(browser, browser.find_element(By.ID, "picture")) == sent  # the first frame, beside it
    assert severe_logs(browser) == []


def test_a_flow_model_given_one_image_says_it_takes_two(browser, server, moving):
    open_console(browser, server)
    choose(browser, moving["optical_flow"])
    assert browser.find_element(By.ID, "file").get_attribute("multiple") is not None
    browser.find_element(By.ID, "file").send_keys(str(SAMPLES / "pan-1.png"))
    error = browser.find_element(By.ID, "error")
    WebDriverWait(browser, WAIT_S).until(lambda b: error.is_displayed())
    assert "takes two images" in error.text and "(1 given)" in error.text
    assert browser.find_element(By.ID, "status").text == ""  # nothing sent
    assert severe_logs(browser) == []


def test_the_console_address_refuses_a_body_over_max_request_size_with_a_413_that_says_it(with_tokens):
    """The relay reads at most max_request_size + 1 bytes of a body and answers 413 above the limit,
    naming it, without passing the request on (no key needed: nothing reaches TorchServe)."""
    limit = int(read_properties(REPO / "config.production.properties")["max_request_size"])
    response = requests.post(f"{with_tokens.console_address}/predictions/digits_net", data=b"\0" * (limit + 1), timeout=60)
    assert response.status_code == 413
    assert f"max_request_size ({limit} bytes)" in response.json()["error"]
    assert requests.post(f"{with_tokens.console_address}/predictions/digits_net", data=b"\0" * 16, timeout=60,
                         headers=client.bearer(with_tokens.keys()["inference"])).status_code == 400  # not an image
