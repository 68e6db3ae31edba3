"""The docs' screenshots of the console, one per task: a real TorchServe (development configuration,
free ports) on a model store, Debian's chromium driven by Selenium as in tests/test_console.py.

    .venv/bin/python scripts/console_screenshots.py --model-store DIR --out docs/

DIR holds digits_net.mar and, for the other tasks, the archives SHOTS names; those missing are
archived here first with random weights that detect something (tvserve/tools/tasks_latency.py),
which the page marks "random (untrained)": the pictures show how answers are drawn, not what a
trained model sees.
"""

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from helpers import CHROMEDRIVER, chrome_options  # noqa: E402 - the browser set-up the tests use

from tvserve.archiving.options import ArchiveOptions  # noqa: E402
from tvserve.archiving.sources import archive_torchvision  # noqa: E402
from tvserve.ops.properties import DEVELOPMENT_CONFIG, free_ports_config  # noqa: E402
from tvserve.ops.server import Server  # noqa: E402
from tvserve.tools.tasks_latency import detecting_weights  # noqa: E402

log = logging.getLogger("console_screenshots")

# (file, model, sample, {input id: value}, explain?)
SHOTS = [
    ("console-classification.png", "digits_net", "7-dark-on-white.png", {"topk": "5"}, True),
    ("console-detection.png", "fasterrcnn_mobilenet_v3_large_320_fpn", "photo.jpg", {"threshold": "0.2", "max-detections": "8"}, False),
    ("console-instance-segmentation.png", "maskrcnn_resnet50_fpn", "photo.jpg",
     {"threshold": "0.5", "max-detections": "5"}, False),
    ("console-keypoints.png", "keypointrcnn_resnet50_fpn", "photo.jpg", {"threshold": "0.9", "max-detections": "4"}, False),
    ("console-semantic-segmentation.png", "lraspp_mobilenet_v3_large", "photo.jpg", {}, False),
    ("console-video-classification.png", "r3d_18", "pan.mp4", {"topk": "5"}, False),
    ("console-optical-flow.png", "raft_small", "pan-1.png + pan-2.png", {}, False),
]
# the page's pictures once they are there: the clip's first frame, the flow image
DRAWN = """const clip = document.getElementById("clip"), flow = document.getElementById("flow");
  return (clip.hidden || clip.readyState >= 2) && (document.getElementById("flow-figure").hidden || flow.complete);"""
WAIT_S = 300


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-store", type=Path, required=True, help="archives to serve (missing task models are added)")
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="where the PNG files go")
    parser.add_argument("--only", default="", help="comma-separated file names of SHOTS to take (default: all)")
    return parser


def ensure_archives(store: Path, models: list) -> None:
    """Archives each torchvision model of `models` missing from `store`, with detecting random weights."""
    for name in models:
        if name == "digits_net" or (store / f"{name}.mar").exists():
            continue
        log.info("archiving %s with random weights ...", name)
        weights = detecting_weights(name, store / f"{name}-random.pth", store)
        archive_torchvision(name, weights_file=weights, options=ArchiveOptions(
            export_path=store, backend="eager", workers=1, batch_size=1, max_batch_delay=1, startup_timeout=600))
        (store / f"{name}-random.pth").unlink()


def shoot(browser, url: str, shot: tuple, out: Path) -> Path:
    """Opens the console, sends the sample to the model with the options, saves the page as drawn."""
    file, model, sample, options, explain = shot
    browser.get(url)
    WebDriverWait(browser, WAIT_S).until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"))
    Select(browser.find_element(By.ID, "model")).select_by_value(model)
    for input_id, value in options.items():
        field = browser.find_element(By.ID, input_id)
        field.clear()
        field.send_keys(value)
    if explain:
        browser.find_element(By.ID, "explain").click()
    browser.find_element(By.CSS_SELECTOR, f'#samples button[data-sample="{sample}"]').click()
    status = browser.find_element(By.ID, "status")
    WebDriverWait(browser, WAIT_S).until(lambda b: f"from /predictions/{model}" in status.text)
    if explain:
        WebDriverWait(browser, WAIT_S).until(lambda b: b.find_element(By.ID, "heatmap-figure").is_displayed())
    WebDriverWait(browser, WAIT_S).until(lambda b: b.execute_script(DRAWN))
    browser.execute_script("document.getElementById('answer').parentElement.open = false;")  # the picture, not the JSON
    path = out / file
    browser.find_element(By.ID, "try-section").screenshot(str(path))
    log.info("wrote %s", path)
    return path


def main(args) -> None:
    shots = [shot for shot in SHOTS if not args.only or shot[0] in args.only.split(",")]
    store = args.model_store.resolve()
    ensure_archives(store, [shot[1] for shot in shots])
    work = Path(tempfile.mkdtemp(prefix="tvserve-shots-"))
    config = free_ports_config(DEVELOPMENT_CONFIG, work / "config.properties")
    models = ",".join(sorted({f"{shot[1]}.mar" for shot in shots}))
    profile = tempfile.mkdtemp(prefix="tvserve-chromium-")
    with Server(model_store=store, config=config, workdir=work / "server", models=models) as server:
        browser = webdriver.Chrome(options=chrome_options(profile), service=Service(CHROMEDRIVER))
        browser.set_window_size(1280, 2400)  # the whole section in the viewport: screenshots are clipped to it
        try:
            for shot in shots:
                shoot(browser, server.console_url, shot, args.out)
        finally:
            browser.quit()
    shutil.rmtree(profile, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(get_args_parser().parse_args())
