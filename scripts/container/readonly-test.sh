#!/usr/bin/env bash
# After `make image`: runs the image as the Kubernetes manifests do (deploy/kubernetes/base/
# deployment.yaml): a read-only root filesystem, user 10001, and only /var/lib/tvserve and /tmp
# writable. No container runtime here can make the root read-only, so the image's root is
# bind-mounted read-only and its ENTRYPOINT runs under chroot, on the host's loopback. Checks
# that the probe's /ready turns 200, a prediction with the token answers, /ready says 503 after
# SIGTERM, and the exit is 0 with nothing left running.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
cd "$(dirname "$0")/../.."
source scripts/container/common.sh
[ "$(id -u)" -eq 0 ] || die "This test mounts and chroots: run it as root."
"${BUILDAH[@]}" inspect --type image "$IMAGE" >/dev/null 2>&1 || die "No image $IMAGE: run \`make image\` first."

work=$(mktemp -d /var/tmp/tvserve-readonly.XXXXXX)
root="$work/root"
mkdir -p "$root" "$work/state" "$work/tmp"
chown 10001:10001 "$work/state" && chmod 0700 "$work/state"
chmod 1777 "$work/tmp"
container=$("${BUILDAH[@]}" from --quiet "$IMAGE")
server=""
cleanup() {
  local code=$?
  set +e
  if [ -n "$server" ]; then container_pids | xargs -r kill -KILL 2>/dev/null; sleep 1; fi
  mountpoint -q "$root" && umount -R -l "$root"  # lazy: detached at once, submounts too
  "${BUILDAH[@]}" umount "$container" >/dev/null 2>&1
  "${BUILDAH[@]}" rm "$container" >/dev/null 2>&1
  [ "$code" -ne 0 ] && tail -n 30 "$work/log" >&2 2>/dev/null
  if grep -q " $work" /proc/self/mounts; then  # never delete through a mount
    echo "Left $work: something is still mounted under it." >&2
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT
container_pids() {  # processes whose root directory is the read-only root
  local p
  for p in /proc/[0-9]*; do [ "$(readlink "$p/root" 2>/dev/null)" = "$root" ] && echo "${p#/proc/}"; done
  true
}

mount --bind "$("${BUILDAH[@]}" mount "$container")" "$root"
mount -o remount,bind,ro "$root"
mount --bind "$work/state" "$root/var/lib/tvserve"
mount --bind "$work/tmp" "$root/tmp"
mount -t proc proc "$root/proc"
# A /dev of its own (tmpfs) with only the devices the JVM and Python open: the host's /dev is
# never mounted inside.
mount -t tmpfs -o mode=0755,size=64k tmpfs "$root/dev"
for device in null zero random urandom; do
  touch "$root/dev/$device" && mount --bind "/dev/$device" "$root/dev/$device"
done
mkdir "$root/dev/shm" && mount -t tmpfs -o mode=1777,size=64m tmpfs "$root/dev/shm"
if touch "$root/opt/tvserve/written" 2>/dev/null; then die "The root is not read-only."; fi

read -r inference management metrics grpc1 grpc2 probe console < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(7)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
# The image's environment (Dockerfile ENV) and the Deployment's, on free loopback ports.
env -i PATH=/opt/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/var/lib/tvserve LANG=C.UTF-8 \
  TVSERVE_WORKDIR=/var/lib/tvserve PYTHONDONTWRITEBYTECODE=1 TINI_SUBREAPER=1 TVSERVE_CPUS=2 \
  TVSERVE_INFERENCE_ADDRESS="http://127.0.0.1:$inference" TVSERVE_MANAGEMENT_ADDRESS="http://127.0.0.1:$management" \
  TVSERVE_METRICS_ADDRESS="http://127.0.0.1:$metrics" TVSERVE_GRPC_INFERENCE_PORT="$grpc1" \
  TVSERVE_GRPC_MANAGEMENT_PORT="$grpc2" TVSERVE_PROBE_ADDRESS="http://127.0.0.1:$probe" TVSERVE_UNREADY_SECONDS=2 \
  TVSERVE_CONSOLE_ADDRESS="http://127.0.0.1:$console" \
  chroot --userspec=10001:10001 "$root" /bin/sh -c 'cd /opt/tvserve && exec /usr/bin/tini -- /opt/tvserve/entrypoint.sh' \
  > "$work/log" 2>&1 &
server=$!
echo "Running the image's ENTRYPOINT on a read-only root as uid 10001 (probe on 127.0.0.1:$probe) ..."
python3 - "$probe" "$inference" "$work/state" "$server" <<'PY'
import json, os, struct, sys, time, urllib.error, urllib.request, zlib
probe, inference, state, server = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

def get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode().strip()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode().strip()
    except OSError as err:
        return None, str(err)

started = time.monotonic()
while (answer := get(f"http://127.0.0.1:{probe}/ready"))[0] != 200:
    os.kill(server, 0)  # the server is still running
    if time.monotonic() - started > 300:
        sys.exit(f"error: /ready not 200 after 300 s: {answer}")
    time.sleep(1)
print(f"/ready 200 after {time.monotonic() - started:.0f} s: {answer[1]}")
token = json.load(open(f"{state}/key_file.json"))["inference"]["key"]
def png(width=8, height=8):  # a small gray PNG: enough to go through the handler
    raw = b"".join(b"\x00" + bytes([128] * width) for _ in range(height))
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
request = urllib.request.Request(f"http://127.0.0.1:{inference}/predictions/digits_net", data=png(), method="PUT",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "image/png"})
with urllib.request.urlopen(request, timeout=30) as response:
    print(f"prediction with the token: HTTP {response.status}, top-1 {json.load(response)[0]['label']}")
PY
pid1=""
for pid in $(container_pids); do
  if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = tini ]; then pid1=$pid; break; fi
done
[ -n "$pid1" ] || die "No tini process under the read-only root."
kill -TERM "$pid1"
sleep 0.5
status=$(python3 -c "import sys, urllib.request, urllib.error
try: print(urllib.request.urlopen(sys.argv[1], timeout=5).status)
except urllib.error.HTTPError as err: print(err.code)" "http://127.0.0.1:$probe/ready")
[ "$status" = 503 ] || die "/ready answered $status after SIGTERM, not 503."
echo "/ready 503 after SIGTERM (draining)"
code=0
wait "$server" || code=$?
server=""
[ "$code" -eq 0 ] || die "Exit code $code after SIGTERM."
left=$(container_pids)
[ -z "$left" ] || die "Processes left after the stop: $left"
echo "Written outside the volumes: none (read-only root). In them: $(cd "$work" && find state tmp -maxdepth 1 -mindepth 1 | sort | tr '\n' ' ')"
echo "readonly-test passed: exit 0, nothing left running."
