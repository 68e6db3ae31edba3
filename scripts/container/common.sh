# shellcheck shell=bash disable=SC2034  # sourced: IMAGE and BUILDAH are used by the scripts
# Shared by scripts/container/*.sh (sourced): the image's name and buildah as this machine needs it.
# No Docker engine here: buildah builds and runs with chroot isolation and vfs storage, as root.
IMAGE=${TVSERVE_IMAGE:-localhost/tvserve:latest}
BUILDAH=(buildah --storage-driver vfs)

die() { echo "$*" >&2; exit 1; }

# Installs the Debian packages named (apt-get, with sudo when not root) unless their commands exist.
need_commands() {
  local missing=() command
  for command in "$@"; do
    command -v "$command" >/dev/null 2>&1 || missing+=("$command")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null 2>&1 \
    || die "tvserve's container scripts need ${missing[*]}: install them (Debian/Ubuntu: apt-get install -y ${missing[*]}) and retry."
  local sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  echo "Installing ${missing[*]} (apt-get) ..."
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Stops with what to do unless the filesystem holding DIR has GB gigabytes free.
need_free() {
  local dir=$1 gb=$2 what=$3 free
  mkdir -p "$dir"
  free=$(df --output=avail -BG "$dir" | tail -n 1 | tr -dc 0-9)
  echo "Disk: ${free} GB free under $dir ($what: about $gb GB)"
  [ "$free" -ge "$gb" ] || die "Only ${free} GB free under $dir; $what needs about $gb GB." \
    "Free some (old images: ${BUILDAH[*]} rmi --prune; pytest's temporary trees: /tmp/pytest-of-$(id -un))" \
    "or point TMPDIR elsewhere, then retry."
}
