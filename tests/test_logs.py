"""Reading TorchServe's logs across a rollover: log4j2 gzips `model_log.log` away every midnight
(and at 100 MB), so a server that runs past midnight keeps its earlier lines only in the rolled
part. What tvserve reads from the logs (why a model does not load, what a worker logged) must
read both."""

import gzip
import os
import re
import zipfile

from tvserve.ops import logs
from tvserve.ops.plugin import frontend_jar

ROLLED = "%d{dd-MMM}"  # the date in both file patterns below


def log_line(model: str, message: str) -> str:
    return f"2026-11-28T23:59:58,123 [INFO ] W-9000-{model}_1.0-stdout MODEL_LOG - {message}\n"


def rolled_patterns() -> list:
    """The rolled files' names in TorchServe's own log4j2.xml and in tvserve's lean one."""
    with zipfile.ZipFile(frontend_jar()) as archive:
        theirs = archive.read("log4j2.xml").decode()
    return [re.search(r'filePattern="[^"]*/model_log\.([^"]+)"', text).group(1) for text in (theirs, logs.log4j2_xml())]


def test_both_configurations_roll_the_model_log_into_a_file_that_is_read(tmp_path):
    for pattern in rolled_patterns():
        assert ROLLED in pattern, pattern
        name = "model_log." + pattern.replace(ROLLED, "28-Nov")
        (tmp_path / name).write_bytes(gzip.compress(log_line("net", "before midnight").encode()))
        assert "before midnight" in logs.read(tmp_path)
        (tmp_path / name).unlink()


def test_a_worker_error_from_before_midnight_is_still_found_and_counted(tmp_path):
    before = (log_line("net", "Backend worker process died.")
              + log_line("net", "ModuleNotFoundError: No module named 'missing'"))
    (tmp_path / "model_log.28-Nov.log.gz").write_bytes(gzip.compress(before.encode()))
    (tmp_path / "model_log.log").write_text(log_line("net", "Backend worker process died.")
                                            + log_line("other", "tvserve: loaded other"))
    assert logs.failed_loads(tmp_path, "net") == 2
    assert "ModuleNotFoundError: No module named 'missing'" in logs.worker_error(tmp_path, "net")
    assert logs.read(tmp_path).index("ModuleNotFoundError") < logs.read(tmp_path).index("loaded other")


def test_rolled_parts_are_read_oldest_first(tmp_path):
    for age, day in ((2, "27-Nov"), (1, "28-Nov")):
        path = tmp_path / f"model_log.{day}.log.gz"
        path.write_bytes(gzip.compress(log_line("net", day).encode()))
        os.utime(path, (path.stat().st_atime - age * 86400, path.stat().st_mtime - age * 86400))
    (tmp_path / "model_log.log").write_text(log_line("net", "today"))
    assert [line.rsplit(" - ", 1)[-1] for line in logs.read(tmp_path).splitlines()] == ["27-Nov", "28-Nov", "today"]


def test_no_log_yet_reads_as_empty(tmp_path):
    assert logs.read(tmp_path) == "" and logs.failed_loads(tmp_path, "net") == 0


def test_a_restarted_server_reads_only_its_own_lines_across_a_rollover(tmp_path):
    """An earlier run's dead workers, in the current file and in a part rolled before the restart,
    are not this run's; this run's lines are read even after the current file rolls over."""
    earlier = tmp_path / "model_log.27-Nov.log.gz"
    earlier.write_bytes(gzip.compress(log_line("net", "Backend worker process died.").encode()))
    os.utime(earlier, (earlier.stat().st_atime - 86400, earlier.stat().st_mtime - 86400))
    current = tmp_path / "model_log.log"
    current.write_text(log_line("net", "Backend worker process died.") * 3)
    start = logs.mark(tmp_path)
    assert logs.failed_loads(tmp_path, "net", start) == 0 and logs.read(tmp_path, since=start) == ""

    with current.open("a") as log:
        log.write(log_line("net", "Backend worker process died.") + log_line("net", "before midnight"))
    rolled = tmp_path / "model_log.28-Nov.log.gz"  # what log4j2 does at midnight
    rolled.write_bytes(gzip.compress(current.read_bytes()))
    current.write_text(log_line("net", "after midnight"))
    assert logs.failed_loads(tmp_path, "net", start) == 1
    assert [line.rsplit(" - ", 1)[-1] for line in logs.read(tmp_path, since=start).splitlines()] == [
        "Backend worker process died.", "before midnight", "after midnight"]
    assert logs.failed_loads(tmp_path, "net") == 5  # from the beginning: both runs
