"""The one reader of `.mar` files on disk: an archive's record, its model-config.yaml, and the
name TorchServe registers it under."""

import json
import zipfile
from pathlib import Path

import yaml

from handlers.record import METADATA_FILE, Record, RecordError
from tvserve import TvserveError

MODEL_CONFIG_FILE = "model-config.yaml"
MANIFEST_FILE = "MAR-INF/MANIFEST.json"


def read_member(mar: Path, name: str) -> bytes:
    """One file of archive `mar`; KeyError when it has none."""
    try:
        with zipfile.ZipFile(mar) as archive:
            return archive.read(name)
    except (FileNotFoundError, IsADirectoryError, zipfile.BadZipFile) as err:
        raise TvserveError(f"{mar} is not a readable .mar archive: {err}") from None


def read_record(mar: Path) -> Record:
    """The tvserve.json of an archive on disk, as a Record."""
    try:
        return Record.from_json(read_member(mar, METADATA_FILE))
    except KeyError:
        raise TvserveError(f"{mar} is not a tvserve archive: it has no {METADATA_FILE}.") from None
    except RecordError as err:
        raise TvserveError(f"{mar}: {err}") from None


def read_model_config(mar: Path) -> dict:
    """The model-config.yaml inside a .mar ({} when it has none)."""
    try:
        return yaml.safe_load(read_member(mar, MODEL_CONFIG_FILE)) or {}
    except KeyError:
        return {}


def manifest_model(mar: Path) -> dict:
    """The "model" part of the archive's TorchServe manifest (modelName, modelVersion, handler, ...)."""
    return json.loads(read_member(mar, MANIFEST_FILE))["model"]


def registered_name(mar: Path) -> str:
    """The name TorchServe registers a .mar under: its manifest's, not the file's."""
    return manifest_model(mar)["modelName"]


def registered_version(mar: Path) -> str:
    """The version TorchServe registers a .mar as: its manifest's (1.0 where it names none)."""
    return manifest_model(mar).get("modelVersion") or "1.0"
