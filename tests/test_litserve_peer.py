"""The bench's LitServe peer (tvserve/tools/litserve_peer.py): the archive's model and preset behind
LitServe answer as tvserve's handler does in-process. LitServe is not in the test extra, so the
server test runs only where `pip install -e '.[peers]'` brought it."""

import importlib.util

import pytest

from tvserve import TvserveError
from tvserve.archiving.options import ArchiveOptions
from tvserve.archiving.sources import archive_checkpoint
from tvserve.tools import peers
from tvserve.tools.bench import answer_gap
from tvserve.tools.inprocess import load_handler, probabilities

HAVE_LITSERVE = importlib.util.find_spec("litserve") is not None


def test_missing_litserve_names_the_install_command(monkeypatch):
    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TvserveError, match=r"pip install -e '\.\[peers\]'"):
        peers.require_litserve()


@pytest.mark.skipif(not HAVE_LITSERVE, reason="LitServe is not installed (not in the test extra): "
                    "`.venv/bin/pip install -e '.[peers]'` brings it")
def test_litserve_answer_equals_in_process(work, digits_run, digit_files):
    store = work / "litserve" / "model_store"
    archive_checkpoint(digits_run / "checkpoint.pt", options=ArchiveOptions(
        model_name="digits_litserve", export_path=store, workers=1, batch_size=1, backend="eager"))
    handler = load_handler(store / "digits_litserve.mar", work / "litserve" / "unpacked")
    image = digit_files[0][0].read_bytes()
    with peers.LitServePeer(handler.model_dir, workdir=work / "litserve" / "server", threads=1) as peer:
        answer = peer.predict(image)
    assert [row["label"] for row in answer] == [handler.record.labels[row["index"]] for row in answer]
    assert len(answer) == 5
    assert answer_gap(answer, probabilities(handler, image), handler.record.labels) <= 1e-4
