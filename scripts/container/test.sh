#!/usr/bin/env bash
# `make image-test` (after `make image`): runs the image's own ENTRYPOINT with buildah on the
# host's network (`podman run` cannot set rlimits here), waits for the image's own HEALTHCHECK to
# pass, predicts held-out digits from the host with the token from the key volume, opens the
# console at its own address (its page without a key, its model list only with one), then sends
# SIGTERM to the container's PID 1 (as `docker stop` does) and checks a clean stop: exit 0 and no
# java or worker process left. Ports are free loopback ports, so other servers may run meanwhile.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
cd "$(dirname "$0")/../.."
source scripts/container/common.sh
need_commands buildah
"${BUILDAH[@]}" inspect --type image "$IMAGE" >/dev/null 2>&1 || die "No image $IMAGE: run \`make image\` first."

config_list() {  # PYTHON EXPRESSION on the image's configuration `d`: a list, one item a line
  "${BUILDAH[@]}" inspect --type image "$IMAGE" \
    | python3 -c 'import json, sys; d = json.load(sys.stdin); print("\n".join('"$1"' or []))'
}
mapfile -t entrypoint < <(config_list 'd["OCIv1"]["config"].get("Entrypoint")')
mapfile -t healthcheck < <(config_list '(d["Docker"]["config"].get("Healthcheck") or {}).get("Test")')
[ "${healthcheck[0]:-}" = CMD ] || die "The image has no exec-form HEALTHCHECK (got: ${healthcheck[*]:-none})."
healthcheck=("${healthcheck[@]:1}")
read -r inference management metrics grpc1 grpc2 probe console < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(7)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')

state=$(mktemp -d /var/tmp/tvserve-image-test.XXXXXX)  # the key volume, /var/lib/tvserve inside
chown 10001:10001 "$state" && chmod 0700 "$state"      # the image's user owns it, as in a volume
log="$state.log"
container=$("${BUILDAH[@]}" from --quiet "$IMAGE")
server=""
cleanup() {
  local code=$?
  if [ -n "$server" ]; then  # a failed test: stop what is still running, keep the logs
    container_pids "$(readlink "/proc/$(container_pid1)/root")" | xargs -r kill -KILL 2>/dev/null || true
    wait "$server" 2>/dev/null || true
  fi
  "${BUILDAH[@]}" rm "$container" >/dev/null 2>&1 || true
  if [ "$code" -ne 0 ] && [ -d "$state/logs" ]; then
    tail -n 30 "$state/logs/model_log.log" "$state/logs/ts_log.log" >&2 2>/dev/null || true
    echo "Logs kept in $state/logs and $log." >&2
  else
    rm -rf "$state" "$state.health" "$log"
  fi
}
trap cleanup EXIT
"${BUILDAH[@]}" config --env TINI_SUBREAPER=1 \
  --env TVSERVE_INFERENCE_ADDRESS="http://127.0.0.1:$inference" \
  --env TVSERVE_MANAGEMENT_ADDRESS="http://127.0.0.1:$management" \
  --env TVSERVE_METRICS_ADDRESS="http://127.0.0.1:$metrics" \
  --env TVSERVE_GRPC_INFERENCE_PORT="$grpc1" --env TVSERVE_GRPC_MANAGEMENT_PORT="$grpc2" \
  --env TVSERVE_PROBE_ADDRESS="http://127.0.0.1:$probe" --env TVSERVE_CONSOLE_ADDRESS="http://127.0.0.1:$console" \
  "$container"
run=("${BUILDAH[@]}" run --isolation chroot --network host --volume "$state:/var/lib/tvserve" "$container" --)
in_container() { "${run[@]}" "$@"; }
# The container's PID 1: buildah run -> buildah-chroot-runtime -> buildah-chroot-exec -> it.
container_pid1() {
  local pid=$server
  for _ in runtime exec pid1; do pid=$(pgrep -P "$pid" | head -n 1) || return 1; done
  echo "$pid"
}
# Processes whose root directory is ROOT (the container's): its PID 1 and all it started.
container_pids() {
  local p
  case $1 in /?*) ;; *) return 0 ;; esac  # never "" or "/": that would be every process
  for p in /proc/[0-9]*; do [ "$(readlink "$p/root" 2>/dev/null)" = "$1" ] && echo "${p#/proc/}"; done
  true
}

echo "Running ${entrypoint[*]} (inference on 127.0.0.1:$inference; log: $log) ..."
start=$SECONDS
"${run[@]}" "${entrypoint[@]}" > "$log" 2>&1 &  # not through a function: $! is buildah's pid
server=$!
failed=0
until in_container "${healthcheck[@]}" > "$state.health" 2>&1; do
  failed=$((failed + 1))
  kill -0 "$server" 2>/dev/null || { cat "$log" >&2; die "The container exited before it was healthy."; }
  [ $((SECONDS - start)) -lt 300 ] || { cat "$log" >&2; die "Not healthy after 300 s: $(cat "$state.health")"; }
  sleep 2
done
echo "HEALTHCHECK passed after $((SECONDS - start)) s (failed $failed times while starting): $(tail -n 1 "$state.health")"
# The probe endpoint a kubelet or a balancer asks (tvserve/ops/probe.py): every model READY.
python3 -c "import sys, urllib.request; print('/ready:', urllib.request.urlopen(sys.argv[1], timeout=10).read().decode().strip())" \
  "http://127.0.0.1:$probe/ready" || die "The probe's /ready did not answer 200 once the HEALTHCHECK passed."

# One held-out digit of each class, written by the image's own Python (the host needs no torch).
in_container python -c '
from torchvision.transforms.functional import to_pil_image
from training.data import load_dataset
split, seen = load_dataset("digits"), set()
for image, label in zip(split.val_images, split.val_labels):
    if int(label) not in seen:
        seen.add(int(label))
        to_pil_image(image).save(f"/var/lib/tvserve/digit_{int(label)}.png")'
python3 - "$state" "http://127.0.0.1:$inference" "http://127.0.0.1:$console" <<'PY'
import json, pathlib, sys, urllib.error, urllib.request
state, url, console = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]

def predict(image, token=None):
    headers = {"Content-Type": "image/png", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(f"{url}/predictions/digits_net", data=image.read_bytes(), headers=headers, method="PUT")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)

images = sorted(state.glob("digit_*.png"))
try:
    predict(images[0])
    sys.exit("error: a prediction without the token was answered: token authorization is off")
except urllib.error.HTTPError as err:
    print(f"without the token: HTTP {err.code} (token authorization is on)")
key_file = state / "key_file.json"
mode = key_file.stat().st_mode & 0o777
if mode != 0o600:
    sys.exit(f"error: {key_file.name} has mode {mode:o}, not 600")
token = json.loads(key_file.read_text())["inference"]["key"]
print("key_file.json in the state volume, mode 600")
right = 0
for image in images:
    label, top = image.stem.split("_")[1], predict(image, token)[0]
    right += top["label"] == label
    print(f"  digit {label}: top-1 {top['label']} ({top['probability']:.3f})")
print(f"{right}/{len(images)} held-out digits right")
if right < len(images) - 1:  # the model is ~98% accurate on held-out digits
    sys.exit("error: the served digits_net does not recognise the digits")
# The console at its own address: its page needs no key, what it relays needs the inference key.
with urllib.request.urlopen(f"{console}/console/", timeout=30) as page:
    if b"<html" not in page.read().lower():
        sys.exit("error: the console's address did not answer its page")
try:
    urllib.request.urlopen(f"{console}/console/api/models", timeout=30)
    sys.exit("error: the console relayed the model list without the key")
except urllib.error.HTTPError as err:
    print(f"console: the page without a key, its model list refused without one (HTTP {err.code})")
request = urllib.request.Request(f"{console}/console/api/models", headers={"Authorization": f"Bearer {token}"})
with urllib.request.urlopen(request, timeout=30) as listing:
    names = [model["name"] for model in json.load(listing)["models"]]
if "digits_net" not in names:
    sys.exit(f"error: the console's model list with the key is {names}")
print("console: the model list with the key names digits_net")
PY

pid1=$(container_pid1) && [ "$(cat "/proc/$pid1/comm")" = tini ] || die "No tini process under buildah (pid $server)."
root=$(readlink "/proc/$pid1/root")
echo "SIGTERM to the container's PID 1 (tini, host pid $pid1) ..."
stop=$SECONDS
kill -TERM "$pid1"
code=0
wait "$server" || code=$?
server=""
left=$(container_pids "$root" | xargs -r ps -o pid=,args= -p || true)
tail -n 3 "$log"
[ "$code" -eq 0 ] || { cat "$log" >&2; die "The container exited with code $code after SIGTERM."; }
[ -z "$left" ] || die "Processes left after the stop: $left"
echo "Stopped cleanly in $((SECONDS - stop)) s: exit 0, no java or worker process left."
echo "image-test passed: $("${BUILDAH[@]}" images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$IMAGE")"
