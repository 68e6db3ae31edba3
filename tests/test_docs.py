"""The documentation: every example marked to run is run against the session's real TorchServe, and
the site builds with `mkdocs build --strict` (no broken link or anchor; the reference generated).

Each `sh`, `bash`, `console` or `python` block in docs/ has a marker on the line before it (see
docs/extending.md, "The documentation"):
    <!-- run -->                 run here; it must exit 0
    <!-- not run: REASON -->     says why it cannot run on one machine
    <!-- output -->              (after a run block) the JSON keys shown are in what it printed, and
                                 text lines appear in order, numbers aside; `output: exact`: exactly
Examples run from a folder where `samples/`, `model_store/`, `runs/digits_net/` and `.tvserve/`
are the test server's, with its ports in place of 8080, 8081 and 8082, and curl failing on an
HTTP error (as `--fail-with-body`).
"""

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import REPO

DOCS = REPO / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
CODE_LANGUAGES = {"sh", "bash", "console", "python"}  # blocks that must say whether they run
MARKER = re.compile(r"^<!-- (run|not run: (?P<reason>.+)|output(?P<exact>: exact)?) -->$")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e-?\d+)?")
IMAGE = re.compile(r"[\w./-]+\.(?:png|jpe?g)\b")
EXAMPLE_TIMEOUT = 300  # s: the longest, `tvserve evaluate` through the server, takes seconds


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    marker: str = None  # "run", "not run: ...", "output", "output: exact", or None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.marker == "run"


def fenced_blocks(page: Path) -> list:
    """The page's fenced code blocks, dedented to their fence, each with the marker line before it."""
    blocks, lines = [], page.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = lines[i].strip()
        if not fence.startswith("```"):
            i += 1
            continue
        indent = len(lines[i]) - len(lines[i].lstrip())
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        match = MARKER.match(before)
        code = "\n".join(line[indent:] for line in lines[i + 1:end])
        blocks.append(Block(page, i + 1, fence[3:].strip(), code, match.group(1) if match else None))
        i = end + 1
    return blocks


def with_outputs(blocks: list) -> list:
    """[(run block, the output block that follows it or None)]."""
    pairs = []
    for block, after in zip(blocks, [*blocks[1:], None]):
        if block.runs:
            pairs.append((block, after if after and (after.marker or "").startswith("output") else None))
    return pairs


BLOCKS = {page: fenced_blocks(page) for page in PAGES}
ALL_BLOCKS = [block for blocks in BLOCKS.values() for block in blocks]
EXAMPLES = [pair for blocks in BLOCKS.values() for pair in with_outputs(blocks)]


def test_every_code_example_says_whether_it_runs():
    code = [block for block in ALL_BLOCKS if block.language in CODE_LANGUAGES]
    unmarked = [block.where for block in code if not block.marker or block.marker.startswith("output")]
    assert not unmarked, f"mark these blocks <!-- run --> or <!-- not run: REASON -->: {unmarked}"
    assert len(EXAMPLES) >= 10 and len(code) > len(EXAMPLES)  # most run; some cannot, and say why


def test_output_blocks_follow_an_example_that_runs():
    outputs = {id(block) for block in ALL_BLOCKS if (block.marker or "").startswith("output")}
    shown = {id(output) for _, output in EXAMPLES if output is not None}
    assert outputs == shown, [block.where for block in ALL_BLOCKS if id(block) in outputs - shown]


def test_examples_name_images_that_exist():
    for block in ALL_BLOCKS:
        for name in IMAGE.findall(block.code):
            if not name.startswith("/"):  # inside a container: copied there by the example itself
                assert (REPO / name).is_file(), f"{block.where}: {name} does not exist (use samples/)"


def test_readme_links_into_pages_that_exist():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (REPO / "README.md").read_text())
    local = [link for link in links if "://" not in link]
    assert any(link.startswith("docs/") for link in local)
    assert [link for link in local if not (REPO / link).exists()] == []


def test_docs_build_strict_with_the_generated_reference(tmp_path):
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    cli = (site / "reference/cli/index.html").read_text()
    assert "tvserve archive torchvision" in cli and "--gpu-decode" in cli and "--max-rss-growth" in cli
    record = (site / "reference/record/index.html").read_text()
    assert all(f"<code>{name}</code>" in record for name in ("keypoint_names", "quantization", "decided", "decode"))
    config = (site / "reference/configuration/index.html").read_text()
    assert "tvserve_threads_per_worker" in config and "number_of_gpu" in config and "TVSERVE_PROBE_ADDRESS" in config


# --- running the examples -------------------------------------------------------------------------

@pytest.fixture
def example_dir(tmp_path, server, digits_run):
    """A folder laid out like a checkout running `make serve`, whose files are the test server's."""
    folder = tmp_path / "checkout"
    (folder / "runs").mkdir(parents=True)
    links = {"samples": REPO / "samples", "model_store": server.model_store, ".tvserve": server.workdir,
             ".venv": Path(sys.prefix), "runs/digits_net": digits_run}
    for name, target in links.items():
        (folder / name).symlink_to(target, target_is_directory=True)
    curl_home = tmp_path / "curl"
    curl_home.mkdir()
    (curl_home / ".curlrc").write_text("fail-with-body\nsilent\nshow-error\n")  # an HTTP error fails the example
    return folder, {"CURL_HOME": str(curl_home)}


def localized(code: str, server) -> str:
    """The example as it runs against the test server: its URLs, and the CLI pointed at them."""
    for port, url in (("8080", server.inference_url), ("8081", server.management_url), ("8082", server.metrics_url)):
        code = code.replace(f"http://127.0.0.1:{port}", url)
    code = code.replace("127.0.0.1:8080", server.inference_url.split("://", 1)[1])
    flags = {"predict": f"--url {server.inference_url}",
             "soak": f"--url {server.inference_url} --management-url {server.management_url}",
             "describe": f"--management-url {server.management_url}"}
    return re.sub(r"\btvserve (predict|soak|describe)\b", lambda m: f"tvserve {m.group(1)} {flags[m.group(1)]}", code)


def run_example(block: Block, folder: Path, env: dict, server) -> subprocess.CompletedProcess:
    code = localized(block.code, server)
    command = [sys.executable, "-c", code] if block.language == "python" else ["bash", "-euo", "pipefail", "-c", code]
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # `tvserve` is this environment's
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT,
                          env={**os.environ, **env, "PATH": path})


def json_documents(text: str) -> list:
    """Every JSON document printed one after another (curl prints bodies back to back)."""
    decoder, documents, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        document, i = decoder.raw_decode(text, i)
        documents.append(document)
    return documents


def keys_of(value) -> set:
    if isinstance(value, dict):
        return set(value) | {key for item in value.values() for key in keys_of(item)}
    if isinstance(value, list):
        return {key for item in value for key in keys_of(item)}
    return set()


def line_pattern(shown: str) -> re.Pattern:
    """A shown output line as a pattern: its text exactly, any number where it shows one."""
    pieces = NUMBER.split(shown.strip())
    return re.compile(NUMBER.pattern.join(map(re.escape, pieces)) + r"$")


def check_output(output: Block, stdout: str):
    if output.language == "json":
        documents = json_documents(stdout)
        shown_keys = set(re.findall(r'"(\w+)"\s*:', output.code))
        assert documents, f"{output.where}: the example printed no JSON"
        assert shown_keys <= set().union(*map(keys_of, documents)), (shown_keys, stdout[:2000])
        shown_type = list if output.code.lstrip().startswith("[") else dict
        assert any(isinstance(document, shown_type) for document in documents), stdout[:2000]
        return
    shown = [line for line in output.code.splitlines() if line.strip() and line.strip() != "..."]
    printed = [line.strip() for line in stdout.splitlines()]
    if output.marker == "output: exact":
        assert printed == [line.strip() for line in shown], f"{output.where}: printed {printed}"
        return
    remaining = iter(printed)  # each shown line, in order, among the printed ones
    for line in shown:
        pattern = line_pattern(line)
        assert any(pattern.match(candidate) for candidate in remaining), f"{output.where}: {line!r} not in {printed}"


@pytest.mark.parametrize("block, output", EXAMPLES, ids=[block.where for block, _ in EXAMPLES])
def test_example_runs_against_a_real_server(block, output, example_dir, server):
    folder, env = example_dir
    result = run_example(block, folder, env, server)
    assert result.returncode == 0, f"{block.where} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert result.stdout.strip(), f"{block.where} printed nothing"
    if output is not None:
        check_output(output, result.stdout)
