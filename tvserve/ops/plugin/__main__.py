"""`python -m tvserve.ops.plugin`: compiles the plugin into the installed package itself (the
container's build stage does, so that its runtime needs only a JRE)."""

import logging

from tvserve.ops.plugin import PREBUILT, build_plugin

logging.basicConfig(level=logging.INFO, format="%(message)s")
print(build_plugin(PREBUILT))
