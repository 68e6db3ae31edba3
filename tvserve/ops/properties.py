"""TorchServe's configuration files: the two that ship with tvserve, reading and writing Java
.properties, and copies with free ports for tests and benchmarks."""

import socket
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent  # the repository's top-level config*.properties link here
DEVELOPMENT_CONFIG = CONFIG_DIR / "config.properties"  # loopback, no token: `make serve`
PRODUCTION_CONFIG = CONFIG_DIR / "config.production.properties"  # tokens, the container's


def read_properties(path: Path) -> dict:
    """A Java .properties file as a dict (key=value lines; '#' comments)."""
    properties = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, value = line.split("=", 1)
            properties[key.strip()] = value.strip()
    return properties


def write_properties(path: Path, properties: dict) -> Path:
    Path(path).write_text("".join(f"{key}={value}\n" for key, value in properties.items()))
    return Path(path)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports_config(base: Path, dest: Path) -> Path:
    """A copy of config `base` with every port moved to a free one, each on its own host."""
    properties = read_properties(base)
    own = ("tvserve_probe_address", "tvserve_console_address")  # tvserve/ops/probe.py, the plugin's ConsoleAddress.java
    optional = [key for key in own if key in properties]
    for key in ("inference_address", "management_address", "metrics_address", *optional):
        host = properties.get(key, "http://127.0.0.1:0").rsplit(":", 1)[0]
        properties[key] = f"{host}:{free_port()}"
    for key in ("grpc_inference_port", "grpc_management_port"):
        properties[key] = str(free_port())
    return write_properties(dest, properties)
