"""The repository's names say what they hold, and an archive carries its own code: the worker never
imports the CLI package, so renaming a folder of it (tvserve/build/ -> tvserve/archiving/) cannot break
an archive built before the rename."""

import ast
import subprocess
import zipfile

from helpers import REPO

# Folder names that packaging tools, .gitignore templates and IDEs take for generated output.
OUTPUT_NAMES = {"build", "dist", "out", "target", "bin", "obj"}


def tracked_files() -> list:
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    return listed.stdout.split()


def test_no_tracked_folder_is_named_like_build_output():
    folders = {part for path in tracked_files() for part in path.split("/")[:-1]}
    assert not folders & OUTPUT_NAMES, f"rename these folders: {sorted(folders & OUTPUT_NAMES)}"


def imported_roots(source: str) -> set:
    roots = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_every_served_archive_imports_nothing_from_the_cli_package(model_store):
    archives = sorted(model_store.glob("*.mar"))
    assert archives
    for path in archives:
        with zipfile.ZipFile(path) as archive:
            sources = [name for name in archive.namelist() if name.endswith(".py")]
            assert "tvserve_handler.py" in {name.rsplit("/", 1)[-1] for name in sources}, path.name
            for name in sources:
                assert "tvserve" not in imported_roots(archive.read(name).decode()), f"{path.name}: {name}"
