"""tvserve's TorchServe frontend plugin: the Open Inference Protocol v2 (`/v2/...`) and KServe v1
(`/v1/...`) routes on the inference port, and the console (`/console/`, `ConsoleEndpoint.java`; at an
address of its own with `tvserve_console_address`, `ConsoleAddress.java`).

TorchServe 0.12's frontend routes only `/v2/models/M/infer` and `/v1/models/M:predict` to a
worker, and without telling the worker which protocol the body is in; health, readiness, model
metadata and any `/versions/` path it does not route at all. Its endpoint plugin SDK (Java, in the
frontend's own jar) gets every path under a first segment, so the Java here (`*.java`) routes
them: it answers health and readiness from TorchServe's model manager, and forwards model-level
requests to the model's worker as an inference job with `tvserve-protocol` and `tvserve-action`
headers. The handler (handlers/protocols/) does all decoding and encoding. It also installs the
API keys an operator supplies as files in TVSERVE_KEYS_DIR (a mounted Secret) in place of
TorchServe's random ones (`SuppliedKeys.java`), so that replicas share them.

The plugin is compiled with the JDK's `javac` against the installed TorchServe's jar the first time a
server starts (about 5 s), and cached by the hash of its sources and of that jar. `python -m
tvserve.ops.plugin` builds it into the installed package itself (the container's build stage does,
so that its runtime needs only a JRE).
"""

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tvserve import TvserveError

log = logging.getLogger(__name__)

SOURCES = Path(__file__).resolve().parent
ENDPOINTS = ("tvserve.plugin.OpenInferenceEndpoint", "tvserve.plugin.KServeV1Endpoint", "tvserve.plugin.ConsoleEndpoint")
SERVICE_FILE = "META-INF/services/org.pytorch.serve.servingsdk.ModelServerEndpoint"
PREBUILT = SOURCES / "build"  # where `python -m tvserve.ops.plugin` puts it


def frontend_jar() -> Path:
    """The installed TorchServe's frontend jar (the plugin SDK and the classes the plugin calls)."""
    import ts

    return Path(ts.__file__).resolve().parent / "frontend" / "model-server.jar"


def fingerprint(jar: Path) -> str:
    digest = hashlib.sha256()
    for source in sorted(SOURCES.glob("*.java")):
        digest.update(source.name.encode() + source.read_bytes())
    digest.update(str(jar.stat().st_size).encode())
    return digest.hexdigest()[:16]


def build_plugin(cache: Path) -> Path:
    """A folder holding the compiled plugin jar, for TorchServe's `--plugins-path`; built once per
    source version under `cache`. Raises TvserveError when no JDK (`javac`, `jar`) is at hand."""
    jar = frontend_jar()
    name = f"plugin-{fingerprint(jar)}"
    if (PREBUILT / name / "tvserve-protocols.jar").is_file():
        return PREBUILT / name
    folder = Path(cache) / name
    if (folder / "tvserve-protocols.jar").is_file():
        return folder
    javac, jar_tool = shutil.which("javac"), shutil.which("jar")
    if not javac or not jar_tool:
        raise TvserveError("tvserve's /v2 and /v1 routes need a JDK 17 to compile its TorchServe plugin: "
                           "install openjdk-17-jdk-headless (javac) and retry.")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # same file system: the rename below is atomic
        classes = Path(tmp) / "classes"
        run([javac, "-nowarn", "-cp", str(jar), "-d", str(classes), *map(str, sorted(SOURCES.glob("*.java")))])
        service = classes / SERVICE_FILE
        service.parent.mkdir(parents=True)
        service.write_text("".join(f"{endpoint}\n" for endpoint in ENDPOINTS))
        staging = Path(tmp) / "tvserve-protocols.jar"
        run([jar_tool, "cf", str(staging), "-C", str(classes), "."])
        os.replace(staging, folder / "tvserve-protocols.jar")  # servers starting at once never see half a jar
    log.info("built the TorchServe protocol plugin in %s", folder)
    return folder


def run(command: list) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise TvserveError(f"Building tvserve's TorchServe plugin failed ({command[0]}):\n{result.stderr[-2000:]}")

