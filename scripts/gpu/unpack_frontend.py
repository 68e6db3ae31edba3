"""Run ON the lent GPU machine (by scripts/gpu/measure.sh): puts TorchServe's frontend back together
from .gpu/frontend.tar.xz (made here by scripts/gpu/deps.sh), so that the HTTP rows can run on a
machine with no Java. Unpacks it into DIR; rebuilds the frontend jar where TorchServe's launcher
looks for it (ts/frontend/ of the `ts` package on the path); puts tvserve's compiled plugin where
tvserve looks for a prebuilt one (keyed by that jar, so no javac is needed); prints the JAVA_HOME.

    python3 scripts/gpu/unpack_frontend.py .gpu/frontend.tar.xz /tmp/tvserve-frontend
"""

import shutil
import sys
import tarfile
import zipfile
from pathlib import Path

from tvserve.ops.plugin import PREBUILT, fingerprint, frontend_jar

MANIFEST = "META-INF/MANIFEST.MF"


def rebuild_jar(contents: Path, jar: Path) -> None:
    """The jar from its unpacked contents, stored (the classes load the same; the size differs)."""
    jar.parent.mkdir(parents=True, exist_ok=True)
    files = sorted(path for path in contents.rglob("*") if path.is_file())
    files.sort(key=lambda path: path.relative_to(contents).as_posix() != MANIFEST)  # the manifest first
    with zipfile.ZipFile(jar, "w", zipfile.ZIP_STORED) as archive:
        for path in files:
            archive.write(path, path.relative_to(contents).as_posix())


def main(packed: str, folder: str) -> None:
    target = Path(folder)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    with tarfile.open(packed) as archive:
        archive.extractall(target, filter="tar")
    frontend = target / "frontend"
    jar = frontend_jar()
    if jar.exists():  # a TorchServe installed with its jar: keep it
        print(f"kept the installed frontend jar {jar}", file=sys.stderr)
    else:
        rebuild_jar(frontend / "jar", jar)
    plugin = PREBUILT / f"plugin-{fingerprint(jar)}"
    plugin.mkdir(parents=True, exist_ok=True)
    shutil.copy(frontend / "tvserve-protocols.jar", plugin / "tvserve-protocols.jar")
    print(frontend / "jre")


if __name__ == "__main__":
    main(*sys.argv[1:])
