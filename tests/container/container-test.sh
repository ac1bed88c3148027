#!/usr/bin/env bash
# make container-test: build the real image from ./Dockerfile with podman (no Docker engine here)
# and check it for real: non-root, archives from the simulator over the host network, passes its
# HEALTHCHECK, and stops with exit 0 on SIGTERM without a partial file under a final name.
#
# Needs root and Debian's package mirror (podman, runc, debootstrap are installed when missing).
# The base image python:3.12-slim is made locally with debootstrap (Debian's python3 posing as the
# official image) and cached; nothing is pulled from a registry.
#   WORK   scratch, recreated each run  (default /tmp/yeastar-archiver-container/work)
#   CACHE  kept between runs             (default /tmp/yeastar-archiver-container/cache)
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
WORK=${WORK:-/tmp/yeastar-archiver-container/work}
CACHE=${CACHE:-/tmp/yeastar-archiver-container/cache}
SUITE=${SUITE:-bookworm}
IMAGE=localhost/yeastar-archiver:test
BASE_TAR=$CACHE/base-$SUITE.tar
PY=$REPO/.venv/bin/python

PASS=0; FAIL=0
check() { local what=$1; shift; if "$@"; then PASS=$((PASS+1)); echo "ok   - $what"; else FAIL=$((FAIL+1)); echo "FAIL - $what"; fi; }
# podman without systemd logs healthcheck-timer noise on every run/rm
quiet() { "$@" 2> >(grep -v 'systemd connection\|Removing timer' >&2); }

# ---------------------------------------------------------------- tools
if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # runc: crun (podman's default) refuses this kernel's hybrid cgroup layout
  apt-get install -y -q --no-install-recommends podman runc buildah debootstrap uidmap slirp4netns \
      fuse-overlayfs catatonit netavark aardvark-dns iptables >/dev/null
fi

# ---------------------------------------------------------------- podman, configured under $WORK
if [ -d "$WORK" ]; then
  { findmnt -rn -o TARGET | grep "^$WORK/" || true; } | sort -r | while read -r m; do umount -l "$m" || true; done
  rm -rf "$WORK"
fi
mkdir -p "$WORK/conf" "$CACHE/debs"
NOFILE=$(ulimit -Hn); [ "$NOFILE" = unlimited ] && NOFILE=1048576
NPROC=32768; HU=$(ulimit -Hu); [ "$HU" != unlimited ] && [ "$HU" -lt "$NPROC" ] && NPROC=$HU
cat > "$WORK/conf/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$WORK/storage"
runroot = "$WORK/run"
CONF
cat > "$WORK/conf/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=$NOFILE:$NOFILE", "nproc=$NPROC:$NPROC"]
netns = "host"
[network]
network_config_dir = "$WORK/networks"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
export CONTAINERS_CONF=$WORK/conf/containers.conf CONTAINERS_STORAGE_CONF=$WORK/conf/storage.conf
export BUILDAH_FORMAT=docker   # the OCI format drops HEALTHCHECK

# ---------------------------------------------------------------- base image
debian_mirror() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri=$(awk -v s="$SUITE" '
      /^[[:space:]]*$/ { if (u != "" && ok) { print u; exit } u=""; ok=0; next }
      /^URIs:/   { u=$2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == s) ok=1 }
      END        { if (u != "" && ok) print u }' "$f" | head -1)
    [ -n "$uri" ] && { echo "$uri"; return; }
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    uri=$(awk -v s="$SUITE" '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i ~ /:\/\//) { if ($(i+1) == s) { print $i; exit } break } }' "$f")
    [ -n "$uri" ] && { echo "$uri"; return; }
  done
  echo "no apt source for $SUITE found" >&2; return 1
}
if [ ! -s "$BASE_TAR" ]; then
  R=$WORK/rootfs
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
      --cache-dir="$CACHE/debs" "$SUITE" "$R" "$(debian_mirror)" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$R/usr/local/share/ca-certificates/"
    chroot "$R" update-ca-certificates >/dev/null 2>&1
  fi
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$R/etc/pip.conf"
  rm -f "$R"/usr/lib/python3*/EXTERNALLY-MANAGED
  ln -sf /usr/bin/python3 "$R/usr/local/bin/python"; ln -sf /usr/bin/python3 "$R/usr/local/bin/python3"
  ln -sf /usr/bin/pip3 "$R/usr/local/bin/pip";       ln -sf /usr/bin/pip3 "$R/usr/local/bin/pip3"
  rm -rf "$R"/var/cache/apt/archives/*.deb "$R"/var/cache/apt/*.bin "$R"/var/lib/apt/lists/*
  tar --numeric-owner -C "$R" -cf "$BASE_TAR.tmp" . && mv "$BASE_TAR.tmp" "$BASE_TAR"
  rm -rf "$R"
fi
podman import -q --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$BASE_TAR" localhost/debian-python:$SUITE >/dev/null
podman tag localhost/debian-python:$SUITE docker.io/library/python:3.12-slim

# ---------------------------------------------------------------- the image
echo "building $IMAGE"
podman build --format docker --pull=never --network host -t "$IMAGE" "$REPO" >"$WORK/build.log" 2>&1 \
  || { tail -30 "$WORK/build.log" >&2; exit 1; }

CIDS=(); SIM_PID=
cleanup() {
  local c; for c in "${CIDS[@]}"; do quiet podman rm -f -t 0 "$c" >/dev/null 2>&1 || true; done
  [ -n "$SIM_PID" ] && kill "$SIM_PID" 2>/dev/null || true
}
trap cleanup EXIT

check "runs as the non-root user 10001" test "$(quiet podman run --rm --entrypoint id "$IMAGE" -u)" = 10001
hc=$(podman image inspect --format '{{json .HealthCheck}}' "$IMAGE")
check "keeps its HEALTHCHECK ($hc)" grep -q '"Test":\["CMD","yeastar-archiver","health"\]' <<<"$hc"
ep=$(podman image inspect --format '{{json .Config.Entrypoint}}' "$IMAGE")
check "exec-form entrypoint behind an init ($ep)" test "$ep" = '["dumb-init","--","yeastar-archiver"]'
check "the archiver answers inside the image" quiet podman run --rm "$IMAGE" --version
check "the image can make off-box copies (the s3 extra is installed)" quiet podman run --rm \
  --entrypoint /opt/yeastar-archiver/bin/python "$IMAGE" -c 'import aiobotocore.session, daemon.destinations'
freeze=$(quiet podman run --rm --entrypoint /opt/yeastar-archiver/bin/pip "$IMAGE" freeze --all)
check "every package in the image is the one pinned in requirements.lock" "$PY" - "$freeze" <<'PYCHECK'
import re, sys
pinned = {m[1].lower().replace("_", "-"): m[2] for m in re.finditer(r"(?m)^([A-Za-z0-9_.-]+)==(\S+)", open("requirements.lock").read())}
lines = sys.argv[1].splitlines()
installed = dict(line.split("==", 1) for line in lines if "==" in line)
extra = {n: v for n, v in installed.items() if n.lower() != "pip" and pinned.get(n.lower().replace("_", "-")) != v}
ours = [line for line in lines if line.startswith("yeastar-archiver @ ") or line.startswith("yeastar_archiver @ ")]
print(f"{len(installed)} pinned packages installed; not as pinned: {extra}; the archiver: {ours}", file=sys.stderr)
sys.exit(1 if extra or not ours else 0)
PYCHECK

# ---------------------------------------------------------------- a real archive run
# Paced at 0.5 MB/s per transfer, so that the last ten recordings stay in flight for seconds:
# long enough for the SIGTERM below to land while they are (a `podman exec` poll takes ~1 s).
"$PY" -m daemon simulate --port 0 --count 40 --size-min 200000 --size-max 900000 --bytes-per-second 500000 \
    >"$WORK/sim.out" 2>"$WORK/sim.err" &
SIM_PID=$!
for _ in $(seq 100); do grep -q 'listening on' "$WORK/sim.out" 2>/dev/null && break; sleep 0.1; done
BASE_URL=$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$WORK/sim.out")
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# The operator's folder, as the README's "Deploy with Docker or Compose" has it: config.yaml and
# client_secret side by side, the secret 0600 and the host user's (root's here) until the README's own
# steps hand it to the image's uid. The recipe's commands come from the README itself
# (tests/test_deploy.py: docker_recipe), so the README is what passes here.
V=$WORK/vol; mkdir -p "$V"
(umask 077; grep -o 'client_secret: .*' "$WORK/sim.out" | cut -d' ' -f2 > "$V/client_secret")
cat > "$V/config.yaml" <<CONF
pbx:
  base_url: $BASE_URL
  client_id: archiver
  client_secret_file: /run/secrets/client_secret
  requests_per_second: 100
sources:
  ids: [$(seq -s, 1000 1029)]
archive:
  dir: /srv/recordings
  min_free_bytes: 0
state:
  path: /var/lib/yeastar-archiver/ledger.db
service:
  listen: 127.0.0.1:$PORT
  shutdown_grace_s: 20
logging:
  format: json
CONF
mapfile -t RECIPE < <("$PY" -c 'import sys; from tests.test_deploy import docker_recipe; print("\n".join(docker_recipe(sys.argv[1])))' "$IMAGE")
[ "${#RECIPE[@]}" -ge 2 ] || { echo "no Docker recipe found in README.md" >&2; exit 1; }
for step in "${RECIPE[@]::${#RECIPE[@]}-1}"; do (cd "$V" && eval "$step"); done
cid=$(cd "$V" && quiet eval "${RECIPE[-1]}")
CIDS+=("$cid")
status_json() { quiet podman exec "$cid" yeastar-archiver status --json 2>/dev/null || echo '{}'; }
counts() { status_json | "$PY" -c 'import json,sys; c=json.load(sys.stdin).get("counts",{}); print(c.get(sys.argv[1],0))' "$1"; }
for _ in $(seq 600); do [ "$(counts done)" = 30 ] && break; sleep 0.2; done
check "archived the 30 queued recordings from the simulator" test "$(counts done)" = 30
check "podman healthcheck run -> healthy" quiet podman healthcheck run "$cid"
# More work, then stop while transfers are in flight.
quiet podman exec "$cid" yeastar-archiver enqueue $(seq 1030 1039) >/dev/null
# The count the loop saw, not a second poll: one `podman exec` takes about a second on a loaded
# host, and a second look often came after the last transfer had ended.
seen=0
for _ in $(seq 100); do seen=$(counts in_progress); [ "$seen" != 0 ] && break; sleep 0.05; done
check "transfers were in flight when stopped ($seen)" test "$seen" != 0
quiet podman stop -t 40 "$cid" >/dev/null
check "exit code 0 after SIGTERM" test "$(podman inspect --format '{{.State.ExitCode}}' "$cid")" = 0
# Not through quiet(): its filter writes asynchronously, and the grep below must see the whole log.
podman logs "$cid" > "$WORK/archiver.log" 2>&1 || true
check "the stop went through the graceful shutdown" grep -q '"event": "shutdown.draining"' "$WORK/archiver.log"
check "no partial file under a final name; every archived file byte-identical" \
  "$PY" - "$(podman volume inspect --format '{{.Mountpoint}}' recordings)" <<'PYCHECK'
import pathlib, sys
from daemon.simulator import SimOptions, make_recordings, recording_bytes
root = pathlib.Path(sys.argv[1])
opts = SimOptions(count=40, size_min=200000, size_max=900000)
want = {r.file: recording_bytes(opts.seed, opts.format, r) for r in make_recordings(opts)}
files = [p for p in root.rglob("*.wav") if not p.name.startswith(".")]
bad = [p.name for p in files if want.get(p.name) != p.read_bytes()]
print(f"{len(files)} final files, {len(bad)} wrong", file=sys.stderr)
sys.exit(1 if bad or len(files) < 30 else 0)
PYCHECK

echo "container-checks: $PASS passed, $FAIL failed"
[ "$FAIL" = 0 ]
