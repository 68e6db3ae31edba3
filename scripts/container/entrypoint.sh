#!/bin/sh
# The container's command: the production configuration, with the addresses the environment
# names, then `tvserve serve --production` in the foreground. SIGTERM (from tini) drains accepted
# requests and stops TorchServe, exit 0; a model that fails or a server that dies exits 1.
#   TVSERVE_INFERENCE_ADDRESS   default http://0.0.0.0:8080
#   TVSERVE_MANAGEMENT_ADDRESS  default http://127.0.0.1:8081 (loopback: set http://0.0.0.0:8081 to publish it)
#   TVSERVE_METRICS_ADDRESS     default http://127.0.0.1:8082 (likewise)
#   TVSERVE_GRPC_INFERENCE_PORT, TVSERVE_GRPC_MANAGEMENT_PORT   default 7070, 7071 (loopback)
#   TVSERVE_PROBE_ADDRESS       default http://127.0.0.1:8083: /ready, /live, /metrics (Kubernetes: 0.0.0.0)
#   TVSERVE_CONSOLE_ADDRESS     default http://0.0.0.0:8079: the console's page, which asks for the inference key
#   TVSERVE_UNREADY_SECONDS     default 0: /ready says 503 this long after SIGTERM, before the drain
#   TVSERVE_KEYS_DIR            unset: TorchServe's random API keys; else a folder (a mounted Secret) with
#                               files `inference` and/or `management` holding the keys every replica shares
# The defaults are config.production.properties' own. Extra arguments go to `tvserve serve`.
set -eu
workdir=${TVSERVE_WORKDIR:-/var/lib/tvserve}
config="$workdir/config.properties"
umask 077
cp /opt/tvserve/config.production.properties "$config"

set_property() {  # KEY VALUE: replaces KEY's line when VALUE is not empty
  [ -z "$2" ] || sed -i "s|^$1=.*|$1=$2|" "$config"
}
set_property inference_address "${TVSERVE_INFERENCE_ADDRESS:-}"
set_property management_address "${TVSERVE_MANAGEMENT_ADDRESS:-}"
set_property metrics_address "${TVSERVE_METRICS_ADDRESS:-}"
set_property grpc_inference_port "${TVSERVE_GRPC_INFERENCE_PORT:-}"
set_property grpc_management_port "${TVSERVE_GRPC_MANAGEMENT_PORT:-}"
set_property tvserve_probe_address "${TVSERVE_PROBE_ADDRESS:-}"
set_property tvserve_console_address "${TVSERVE_CONSOLE_ADDRESS:-}"
set_property tvserve_unready_seconds "${TVSERVE_UNREADY_SECONDS:-}"

exec tvserve serve --production --config "$config" --workdir "$workdir" "$@"
