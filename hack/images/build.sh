#!/usr/bin/env bash
# Builds the project's two images from a Debian bookworm minbase root filesystem, with
# no registry: edgeai-operator:<version> (the operator: kopf, kubernetes, pyyaml,
# aiohttp + the package and its pinned requirements; no onnxruntime, no torch) and
# edgeai-worker:<version> (a stage pod and its fetch init container: the package + the
# pinned `worker` extra, onnxruntime, onnx and tenseal; no torch, but digits_cnn's zoo files
# built with the host's torch in /opt/edgeai/cache). <version> is pyproject.toml's.
# With `trainer`, also edgeai-trainer:<version> (a DNNTrainingJob's aggregator and
# workers: the worker image's packages plus the pinned `train` extra, torch among them;
# PyPI's Linux torch wheels carry CUDA, so this image is several GB).
#
#   hack/images/build.sh            # operator and worker; prints their names last
#   hack/images/build.sh trainer    # the trainer too; prints the three names last
#
# Python is Debian's python3 (3.11) in a venv at /opt/edgeai; packages come from PyPI at
# build time, at the versions pinned in pyproject.toml. The build may need this host's
# egress CAs (from the host's CA bundle); they are used from a temporary file in the
# build root and are not in the images. The images run as the non-root user edgeai
# (uid 10001). Caches: $EDGEAI_CACHE/images/ (default ~/.cache/edgeai).
set -euo pipefail

DEBIAN_SUITE=bookworm
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_PACKAGES=python3,python3-venv,ca-certificates
USER_ID=10001

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${EDGEAI_CACHE:-$HOME/.cache/edgeai}
work=$cache/images
mkdir -p "$work"
host_python=${PYTHON:-python3}
log() { printf '[images %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
[ "$(id -u)" = 0 ] || { echo "hack/images/build.sh needs root (debootstrap, chroot)" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "dockerd is not running: run hack/kind/host.sh first" >&2; exit 1; }

version=$("$host_python" -c 'import tomllib,sys; print(tomllib.load(open(sys.argv[1],"rb"))["project"]["version"])' "$repo/pyproject.toml")
# "name==version" lines: the package's requirements, or an extra's.
pins() {
  "$host_python" - "$repo/pyproject.toml" "$1" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
reqs = project["dependencies"] if sys.argv[2] == "-" else project["optional-dependencies"][sys.argv[2]]
for r in reqs:
    if "==" not in r:
        sys.exit(f"pyproject.toml: {r!r} is not pinned (name==version)")
    print(r)
PY
}

# 1. Base root filesystem and image: debootstrap minbase + python3, the user, no docs.
base_stamp=$(echo "$DEBIAN_SUITE $BASE_PACKAGES $USER_ID v1" | sha256sum | cut -c1-12)
base_tar=$work/base-$DEBIAN_SUITE-$base_stamp.tar
base_image=edgeai-base:$base_stamp
if [ -s "$base_tar" ]; then
  log "base root filesystem cached ($base_tar)"
else
  log "debootstrap $DEBIAN_SUITE minbase + $BASE_PACKAGES (about 1 min)"
  t0=$(date +%s)
  root=$work/base-rootfs.tmp
  rm -rf "$root"
  debootstrap --variant=minbase --include="$BASE_PACKAGES" "$DEBIAN_SUITE" "$root" "$DEBIAN_MIRROR" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  chroot "$root" useradd --uid "$USER_ID" --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin edgeai
  rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
         "$root"/usr/share/info/* "$root"/usr/share/locale/* "$root"/var/log/*
  tar -C "$root" -cf "$base_tar.tmp" . && mv "$base_tar.tmp" "$base_tar"
  rm -rf "$root"
  log "base root filesystem built in $(( $(date +%s) - t0 ))s ($(du -h "$base_tar" | cut -f1))"
fi
if docker image inspect "$base_image" >/dev/null 2>&1; then
  log "$base_image imported"
else
  docker import "$base_tar" "$base_image" >/dev/null
  log "imported $base_image"
fi

# The package itself, as a wheel (no dependencies: they are pinned below).
wheels=$work/wheels
rm -rf "$wheels" && mkdir -p "$wheels"
"$host_python" -m pip wheel --quiet --no-deps --no-build-isolation -w "$wheels" "$repo" >&2
wheel=$(ls "$wheels"/edgeai_operator-"$version"-*.whl)
# The wheel's bytes change with every build (zip timestamps): key the images on the sources.
src_hash=$(cd "$repo" && find operator workers -type f \( -name '*.py' -o -name py.typed \) -not -path '*/__pycache__/*' \
  | sort | xargs cat pyproject.toml | sha256sum | cut -c1-12)

# 2. One image: a venv at /opt/edgeai built in a chroot of the base, copied onto the base.
build_image() { # name extra-or-none [another extra]
  local name=$1 extra=$2 more=${3:-} ctx root reqs t0 stamp
  reqs=$(pins -); [ "$extra" = none ] || reqs+=$'\n'$(pins "$extra")
  [ -z "$more" ] || reqs+=$'\n'$(pins "$more")
  stamp=$( { echo "$base_stamp $name"; echo "$reqs"; echo "$src_hash"; cat "$0"; } | sha256sum | cut -c1-12)
  if [ "$(docker image inspect -f '{{index .Config.Labels "dev.edgeai.build"}}' "$name:$version" 2>/dev/null)" = "$stamp" ]; then
    log "$name:$version up to date (build $stamp)"
    return
  fi
  log "building $name:$version: $(echo "$reqs" | tr '\n' ' ')"
  t0=$(date +%s)
  ctx=$work/$name.ctx; root=$ctx/root
  rm -rf "$ctx" && mkdir -p "$root"
  tar -C "$root" -xf "$base_tar"
  cp "$wheel" "$root/tmp/"
  cp /etc/ssl/certs/ca-certificates.crt "$root/tmp/build-ca.pem"   # the host's bundle, egress CAs included
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  mount --bind /proc "$root/proc"; mount --bind /dev "$root/dev"
  # shellcheck disable=SC2064  # expand now: the paths are this image's
  trap "umount '$root/proc' '$root/dev' 2>/dev/null || true" EXIT
  local -a env_clean=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root PIP_CERT=/tmp/build-ca.pem
                      PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_DEFAULT_TIMEOUT=180)
  "${env_clean[@]}" chroot "$root" python3 -m venv /opt/edgeai
  # shellcheck disable=SC2086  # one requirement per word
  "${env_clean[@]}" chroot "$root" /opt/edgeai/bin/pip install --quiet --only-binary=:all: $reqs >&2
  "${env_clean[@]}" chroot "$root" /opt/edgeai/bin/pip install --quiet --no-deps "/tmp/$(basename "$wheel")" >&2
  # Build tools are not needed at run time; kubernetes' asyncio client (kubernetes/aio,
  # 68 MB with its bytecode) is imported by nothing here: the operator talks to the API
  # through kopf and the synchronous client. The image test imports both packages.
  "${env_clean[@]}" chroot "$root" /opt/edgeai/bin/pip uninstall --quiet --yes setuptools pip >&2
  local site=/opt/edgeai/lib/python3.11/site-packages
  # torch's GPU compiler (triton, 1 GB) is imported only to compile for a GPU: training
  # here runs torch eagerly on CPUs. The CUDA libraries themselves stay: libtorch links them.
  rm -rf "$root$site/triton" "$root$site"/triton-*.dist-info
  rm -rf "$root$site/kubernetes/aio"
  # numpy's own test suites (16 MB) are never imported. kubernetes' generated client
  # (api/ and models/: 55 MB as source plus bytecode) is kept as bytecode only, without
  # docstrings: `compileall -OO -b` writes each module's .pyc where its .py was, which
  # Python imports without the source (17 MB). Its tracebacks show no source lines.
  find "$root$site/numpy" -depth -type d -name tests -exec rm -rf {} +
  # Nor are the C sources, headers and type stubs packages ship (7 MB with numpy's f2py,
  # its C headers and PyInstaller hooks): Python imports none of them.
  find "$root$site" \( -name '*.c' -o -name '*.h' -o -name '*.cpp' -o -name '*.pyx' \
    -o -name '*.pxd' -o -name '*.pyi' \) -type f -delete
  rm -rf "$root$site/numpy/_pyinstaller" "$root$site/numpy/_core/include"
  # scipy (scikit-learn's, in the trainer) star-imports numpy, which imports numpy.f2py
  [ "$name" = edgeai-trainer ] || rm -rf "$root$site/numpy/f2py"
  # Extension modules' symbol tables are for debuggers (aiohttp's parser: 3.3 -> 0.6 MB).
  # Not those of a package whose wheel bundles libraries (numpy and numpy.libs): auditwheel
  # rewrote them with patchelf, and stripping those breaks their loading.
  local so top
  while IFS= read -r so; do
    top=${so#"$root$site/"}; top=${top%%/*}
    # torch and its CUDA libraries: as shipped (GBs to rewrite, and torch loads them by path)
    case $top in *.libs|torch|nvidia) continue ;; esac
    [ -d "$root$site/$top.libs" ] && continue
    strip --strip-unneeded "$so"
  done < <(find "$root$site" -name '*.so*' -type f)
  "${env_clean[@]}" chroot "$root" /usr/bin/python3 -OO -m compileall -q -b "$site/kubernetes/client" >&2
  find "$root$site/kubernetes/client" -name '*.py' -delete
  find "$root$site/kubernetes/client" -depth -type d -name __pycache__ -exec rm -rf {} +
  umount "$root/proc" "$root/dev"; trap - EXIT
  mkdir -p "$ctx/opt" && mv "$root/opt/edgeai" "$ctx/opt/"
  rm -rf "$root"
  local image_env=""
  if [ "$name" = edgeai-worker ]; then
    # digits_cnn's exports, variants, noise-trained files, the offload folder, the heads
    # on its trunk and the digits split, built with the host's torch and scikit-learn (the
    # image has neither) into the cache the worker reads first:
    # a `zoo: digits_cnn` DNNModel prepares on real pods (other zoo models need torch).
    mkdir -p "$ctx/opt/edgeai/cache/zoo"
    PYTHONPATH="$repo/workers" "$host_python" -c '
import shutil, sys
from edgeai_worker import variants, zoo
files = [*variants.prebuild_digits(), zoo.cache_dir() / f"digits-split-{zoo.code_hash()}.npz"]
for path in files:
    if path.is_dir():
        shutil.copytree(path, f"{sys.argv[1]}/{path.name}", dirs_exist_ok=True)
    else:
        shutil.copy(path, sys.argv[1])
' "$ctx/opt/edgeai/cache/zoo" >&2
    chmod -R a+rX "$ctx/opt/edgeai/cache"
    image_env=" EDGEAI_CACHE_DIR=/opt/edgeai/cache"
  fi
  cat >"$ctx/Dockerfile" <<DOCKERFILE
FROM $base_image
COPY opt/ /opt/
ENV PATH=/opt/edgeai/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1$image_env
USER $USER_ID:$USER_ID
WORKDIR /tmp
LABEL org.opencontainers.image.title="$name" org.opencontainers.image.version="$version" \\
      org.opencontainers.image.source="edgeai-operator" dev.edgeai.build="$stamp"
ENTRYPOINT ["edgeai"]
DOCKERFILE
  DOCKER_BUILDKIT=0 docker build --quiet -t "$name:$version" "$ctx" >/dev/null 2>"$work/docker-build.err" \
    || { cat "$work/docker-build.err" >&2; exit 1; }
  rm -rf "$ctx"
  # the build this one replaced, now untagged (the trainer's is several GB)
  docker image prune -f --filter "label=org.opencontainers.image.title=$name" >/dev/null
  log "$name:$version built in $(( $(date +%s) - t0 ))s ($(docker image inspect -f '{{.Size}}' "$name:$version" | awk '{printf "%.0f MB", $1/1e6}'))"
}

build_image edgeai-operator none
build_image edgeai-worker worker
[ "${1:-}" != trainer ] || build_image edgeai-trainer worker train
echo "edgeai-operator:$version"
echo "edgeai-worker:$version"
[ "${1:-}" != trainer ] || echo "edgeai-trainer:$version"
