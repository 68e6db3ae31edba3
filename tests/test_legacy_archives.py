"""Archives built before the versioned record still serve: tests/data/legacy_digits_format1.mar was
written by tvserve at commit 851199e (`tvserve archive checkpoint` of the book's Net trained 3 epochs
on digits, --backend eager --workers 1 --batch-size 1), with its unversioned tvserve.json and its own
copy of the handler of that time."""

import json
import shutil
import zipfile

import torch

from helpers import REPO, run_tvserve, served_probabilities
from tvserve.archiving.mar import read_record
from tvserve.ops import client
from tvserve.tools.inprocess import load_handler, probabilities

LEGACY = REPO / "tests" / "data" / "legacy_digits_format1.mar"


def test_the_legacy_archive_predates_the_record_format():
    with zipfile.ZipFile(LEGACY) as archive:
        raw = json.loads(archive.read("tvserve.json"))
        names = archive.namelist()
    assert "format" not in raw and "task" not in raw
    assert "image_classifier.py" in names and "handlers/decoding.py" in names  # the handler of that time


def test_a_legacy_archive_is_read_described_and_served_like_in_process(server, model_store, digit_files, work):
    record = read_record(LEGACY)
    assert record.format == 1 and record.task == "classification" and record.labels == [str(i) for i in range(10)]
    described = run_tvserve("describe", LEGACY)
    assert described.returncode == 0, described.stderr
    assert json.loads(described.stdout)["name"] == "legacy_digits"

    shutil.copy(LEGACY, model_store / "legacy_digits.mar")
    handler = load_handler(LEGACY, work / "unpacked" / "legacy")  # today's handler code, the old record
    client.register("legacy_digits.mar", management_url=server.management_url)
    try:
        for path, _ in digit_files[:5]:
            data = path.read_bytes()
            served = served_probabilities(server, "legacy_digits", data, 10)  # the archive's own handler
            torch.testing.assert_close(served, probabilities(handler, data), rtol=0, atol=1e-6)
    finally:
        client.unregister("legacy_digits", "1.0", management_url=server.management_url)
        (model_store / "legacy_digits.mar").unlink()
