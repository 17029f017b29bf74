#!/usr/bin/env bash
# Assembles an offline kind node image for Kubernetes v1.34.4 (kind v0.30.0), with no
# registry and nothing from the internet: every binary comes from the Go module proxy
# (pinned modules in hack/kind/k8s, hack/kind/coredns) or from Debian (debootstrap), and
# the component images kubeadm wants are built here and preloaded into the node's
# containerd. See docs/architecture.md ("Images and a local kind cluster").
#
#   hack/kind/node-image.sh             # everything; prints the node image name last
#   hack/kind/node-image.sh binaries    # only the Go builds (kind, kubelet, kubeadm, ...)
#   hack/kind/node-image.sh components  # only the component images kubeadm wants
#
# Cached under $EDGEAI_CACHE/kind-v1.34.4/ (default ~/.cache/edgeai); each step is
# skipped, with a message, when its output exists and its inputs are unchanged.
set -euo pipefail

K8S_VERSION=v1.34.4
KIND_VERSION=v0.30.0
COREDNS_VERSION=v1.12.1   # kubeadm v1.34's CoreDNSVersion
PAUSE_VERSION=3.10.1      # kubeadm v1.34's PauseVersion (and containerd's sandbox_image)
ETCD_TAG=3.6.5-0          # kubeadm v1.34's etcd tag; the image runs hack/etcd's v3.6.13
DEBIAN_SUITE=bookworm
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
NODE_IMAGE=edgeai/kind-node:$K8S_VERSION
CNI_IMAGE=docker.io/edgeai/cni:$K8S_VERSION

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${EDGEAI_CACHE:-$HOME/.cache/edgeai}
work=$cache/kind-$K8S_VERSION
bin=$work/bin
mkdir -p "$bin"

export CGO_ENABLED=0 GOFLAGS=-mod=mod
log() { printf '[node-image %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
stamp_of() { cat "$@" | sha256sum | cut -c1-16; }
fresh() { [ -e "$1" ] && [ "$(cat "$1.stamp" 2>/dev/null)" = "$2" ]; }
mark() { echo "$2" > "$1.stamp"; }
progress() { awk -v tag="$1" '{n++; if (n % 200 == 0) printf "[node-image] ... %s: %d packages compiled (last: %s)\n", tag, n, $0; fflush()}' >&2; }

build_binaries() {
  local s
  s=$(stamp_of "$here/k8s/go.mod" "$here/k8s/go.sum" <(echo "$K8S_VERSION"))
  if fresh "$bin/kubelet" "$s" && fresh "$bin/kubeadm" "$s" && fresh "$bin/kube-proxy" "$s"; then
    log "kubelet, kubeadm, kube-proxy $K8S_VERSION cached"
  else
    local minor=${K8S_VERSION#v1.} now ldflags="-s -w" t0 pkg
    minor=${minor%%.*}; now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
      ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$now"
    done
    log "building kubelet, kubeadm, kube-proxy $K8S_VERSION (cold: 5-15 min on 2 cores)"
    t0=$(date +%s)
    (cd "$here/k8s" && go build -v -trimpath -tags selinux,notest -ldflags "$ldflags" -o "$bin/" \
       k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kubeadm k8s.io/kubernetes/cmd/kube-proxy 2>&1 | progress kubernetes)
    for pkg in kubelet kubeadm kube-proxy; do mark "$bin/$pkg" "$s"; done
    log "kubelet, kubeadm, kube-proxy built in $(( $(date +%s) - t0 ))s"
  fi

  s=$(stamp_of "$here/coredns/go.mod" "$here/coredns/go.sum" "$here/coredns/main.go")
  if fresh "$bin/coredns" "$s"; then
    log "coredns $COREDNS_VERSION cached"
  else
    log "building coredns $COREDNS_VERSION (minimal plugin set; cold: 3-5 min)"
    t0=$(date +%s)
    (cd "$here/coredns" && go build -v -trimpath -ldflags "-s -w" -o "$bin/coredns" . 2>&1 | progress coredns)
    mark "$bin/coredns" "$s"
    log "coredns built in $(( $(date +%s) - t0 ))s"
  fi

  if fresh "$bin/kind" "$KIND_VERSION"; then
    log "kind $KIND_VERSION cached"
  else
    log "building kind $KIND_VERSION"
    t0=$(date +%s)
    (cd /tmp && GOFLAGS='' GOBIN="$bin" go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kind@$KIND_VERSION")
    mark "$bin/kind" "$KIND_VERSION"
    log "kind built in $(( $(date +%s) - t0 ))s"
  fi

  # pause: built from the C source in the k8s.io/kubernetes module zip (static, gcc).
  if fresh "$bin/pause" "$PAUSE_VERSION"; then
    log "pause $PAUSE_VERSION cached"
  else
    local kdir
    kdir=$(cd /tmp && GOFLAGS='' go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
    gcc -Os -Wall -Werror -static -DVERSION="v$PAUSE_VERSION" -o "$bin/pause" "$kdir/build/pause/linux/pause.c"
    mark "$bin/pause" "$PAUSE_VERSION"
    log "pause $PAUSE_VERSION built"
  fi
}

docker_ready() {
  [ "$(id -u)" = 0 ] || { echo "node-image.sh needs root (debootstrap, chroot, containerd)" >&2; exit 1; }
  docker info >/dev/null 2>&1 || { echo "dockerd is not running: run hack/kind/host.sh first" >&2; exit 1; }
}

# debootstrap_tar NAME PACKAGES: prints the cached tar of a bookworm minbase root with PACKAGES.
debootstrap_tar() {
  local name=$1 packages=$2 s tar root t0
  s=$(echo "$DEBIAN_SUITE $packages" | sha256sum | cut -c1-12)
  tar=$work/$name-$DEBIAN_SUITE-$s.tar
  if [ -s "$tar" ]; then
    log "$name root filesystem cached"
  else
    log "debootstrap $DEBIAN_SUITE minbase for $name (+$packages)"
    t0=$(date +%s); root=$work/$name.rootfs.tmp
    rm -rf "$root"
    debootstrap --variant=minbase --include="$packages" "$DEBIAN_SUITE" "$root" "$DEBIAN_MIRROR" \
      >"$work/debootstrap-$name.log" 2>&1 || { tail -20 "$work/debootstrap-$name.log" >&2; exit 1; }
    rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
           "$root"/usr/share/man/* "$root"/usr/share/locale/*
    tar -C "$root" -cf "$tar.tmp" . && mv "$tar.tmp" "$tar"
    rm -rf "$root"
    log "$name root filesystem in $(( $(date +%s) - t0 ))s ($(du -h "$tar" | cut -f1))"
  fi
  echo "$tar"
}

image_fresh() { [ "$(docker image inspect -f '{{index .Config.Labels "dev.edgeai.build"}}' "$1" 2>/dev/null)" = "$2" ]; }

# build_image TAG DOCKERFILE FILE...: a classic-builder image from FILEs; skipped when
# the image was built from the same Dockerfile and files.
build_image() {
  local tag=$1 body=$2 ctx=$work/ctx s; shift 2
  s=$( { echo "$body"; cat "$@"; } | sha256sum | cut -c1-12)
  if image_fresh "$tag" "$s"; then log "$tag up to date"; return; fi
  rm -rf "$ctx" && mkdir -p "$ctx"
  cp "$@" "$ctx/"
  printf '%s\nLABEL dev.edgeai.build="%s"\n' "$body" "$s" >"$ctx/Dockerfile"
  DOCKER_BUILDKIT=0 docker build --quiet -t "$tag" "$ctx" >/dev/null 2>"$work/docker-build.err" \
    || { cat "$work/docker-build.err" >&2; exit 1; }
  rm -rf "$ctx"
  log "built $tag"
}

# Component images: one Debian minbase layer (iptables, nftables, conntrack, iproute2 for
# kube-proxy and the CNI DaemonSet) under each, plus its binary; tags exactly as kubeadm
# v1.34 asks for them (its pods pull IfNotPresent, so a preloaded tag is never pulled).
component_tags() {
  printf '%s\n' registry.k8s.io/kube-{apiserver,controller-manager,scheduler,proxy}:"$K8S_VERSION" \
    "registry.k8s.io/etcd:$ETCD_TAG" "registry.k8s.io/coredns/coredns:$COREDNS_VERSION" \
    "registry.k8s.io/pause:$PAUSE_VERSION" "$CNI_IMAGE"
}

component_images() {
  local cpbin tar base c
  cpbin=$(bash "$repo/hack/build-binaries.sh" kubernetes etcd | tail -1)
  tar=$(debootstrap_tar component-base iptables,nftables,conntrack,iproute2)
  base=edgeai/kind-component-base:$(basename "$tar" .tar | sed 's/.*-//')
  if docker image inspect "$base" >/dev/null 2>&1; then
    log "$base imported"
  else
    docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' "$tar" "$base" >/dev/null
    log "imported $base"
  fi
  for c in kube-apiserver kube-controller-manager kube-scheduler; do
    build_image "registry.k8s.io/$c:$K8S_VERSION" "FROM $base
COPY $c /usr/local/bin/" "$cpbin/$c"
  done
  build_image "registry.k8s.io/kube-proxy:$K8S_VERSION" "FROM $base
COPY kube-proxy /usr/local/bin/" "$bin/kube-proxy"
  build_image "registry.k8s.io/etcd:$ETCD_TAG" "FROM $base
COPY etcd /usr/local/bin/" "$cpbin/etcd"
  build_image "registry.k8s.io/coredns/coredns:$COREDNS_VERSION" "FROM $base
COPY coredns /coredns
ENTRYPOINT [\"/coredns\"]" "$bin/coredns"
  build_image "registry.k8s.io/pause:$PAUSE_VERSION" "FROM scratch
COPY pause /pause
USER 65535:65535
ENTRYPOINT [\"/pause\"]" "$bin/pause"
  # the NetworkPolicy enforcer beside the CNI: Go's standard library only
  (cd "$here/netpol" && GOFLAGS= go build -trimpath -o "$bin/edgeai-netpol" .)
  build_image "$CNI_IMAGE" "FROM $base
COPY kubectl edgeai-netpol /usr/local/bin/" "$cpbin/kubectl" "$bin/edgeai-netpol"
}

# Node image: kind v0.30.0's base image replayed on Debian bookworm (Debian's containerd
# 1.6 and runc), the node binaries, our CNI manifest, and the component images preloaded
# into the node's containerd store by a second containerd on the host.
NODE_PACKAGES=systemd,systemd-sysv,dbus,containerd,runc,containernetworking-plugins,conntrack,iptables,nftables,iproute2,ethtool,util-linux,mount,kmod,libseccomp2,pigz,bash,ca-certificates,curl,jq,procps

# configure_node ROOT: kind's base files and Dockerfile steps on a node root (never "/").
configure_node() {
  local root=$1 kindfiles p
  if [ -z "$root" ] || [ "$root" = / ] || [ ! -d "$root/etc" ]; then
    echo "configure_node: bad root '$root'" >&2; exit 1
  fi
  kindfiles=$(cd /tmp && GOFLAGS='' go mod download -json "sigs.k8s.io/kind@$KIND_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')/images/base/files
  install -d -m 0755 "$root"/kind/bin "$root"/kind/manifests "$root"/LICENSES "$root"/etc/containerd "$root"/etc/default \
    "$root"/etc/sysctl.d "$root"/etc/systemd/system/kubelet.service.d "$root"/etc/kubernetes/manifests "$root"/opt/cni/bin
  install -m 0755 "$kindfiles"/usr/local/bin/* "$root"/usr/local/bin/
  install -m 0755 "$kindfiles"/kind/bin/* "$root"/kind/bin/
  install -m 0644 "$kindfiles"/kind/README.txt "$root"/kind/
  install -m 0644 "$kindfiles"/LICENSES/* "$root"/LICENSES/
  install -m 0644 "$kindfiles"/etc/crictl.yaml "$root"/etc/
  install -m 0644 "$kindfiles"/etc/containerd/config.toml "$root"/etc/containerd/
  install -m 0644 "$kindfiles"/etc/default/* "$root"/etc/default/
  install -m 0644 "$kindfiles"/etc/sysctl.d/* "$root"/etc/sysctl.d/
  install -m 0644 "$kindfiles"/etc/systemd/system/{containerd.service,kubelet.service,undo-mount-hacks.service,kubelet.slice} \
    "$root"/etc/systemd/system/
  install -m 0644 "$kindfiles"/etc/systemd/system/kubelet.service.d/* "$root"/etc/systemd/system/kubelet.service.d/
  # Debian's containerd lives in /usr/bin.
  sed -i 's|^ExecStart=/usr/local/bin/containerd|ExecStart=/usr/bin/containerd|' "$root"/etc/systemd/system/containerd.service
  # containerd: no fuse-overlayfs (rootless only), our pause tag, and restrict_oom_score_adj:
  # nothing here may set a negative oom_score_adj (no CAP_SYS_RESOURCE), and with kind's
  # `false` every pod sandbox fails ("can't get final child's PID from pipe: EOF").
  python3 "$here/containerd-config.py" "$root/etc/containerd/config.toml" "registry.k8s.io/pause:$PAUSE_VERSION"
  # kind's Dockerfile RUN steps
  find "$root"/lib/systemd/system/sysinit.target.wants/ -name systemd-tmpfiles-setup.service -delete
  rm -f "$root"/lib/systemd/system/multi-user.target.wants/* "$root"/etc/systemd/system/*.wants/* \
        "$root"/lib/systemd/system/local-fs.target.wants/* "$root"/lib/systemd/system/sockets.target.wants/*udev* \
        "$root"/lib/systemd/system/sockets.target.wants/*initctl* "$root"/lib/systemd/system/basic.target.wants/*
  echo "ReadKMsg=no" >>"$root"/etc/systemd/journald.conf
  [ -e "$root"/sbin/init ] || ln -s /lib/systemd/systemd "$root"/sbin/init
  chroot "$root" systemctl enable kubelet.service containerd.service undo-mount-hacks.service >/dev/null 2>&1
  chroot "$root" systemctl mask systemd-binfmt.service >/dev/null 2>&1
  chroot "$root" ctr oci spec \
    | jq '.hooks.createContainer[.hooks.createContainer | length] |= . + {"path": "/kind/bin/mount-product-files.sh"}' \
    | jq 'del(.process.rlimits)' >"$root"/etc/containerd/cri-base.json
  for p in "$root"/usr/lib/cni/*; do ln -sf "/usr/lib/cni/$(basename "$p")" "$root"/opt/cni/bin/; done
}

# preload ROOT: imports the component images into ROOT's containerd store with a second
# containerd (the host's, Debian's 1.6) whose root is the node's /var/lib/containerd.
preload() {
  local root=$1 pre=$work/preload sock pid n
  rm -rf "$pre" && mkdir -p "$pre"
  sock=$pre/containerd.sock
  cat >"$pre/config.toml" <<TOML
version = 2
root = "$root/var/lib/containerd"
state = "$pre/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
[debug]
  address = ""
TOML
  component_tags | xargs docker save -o "$pre/images.tar"
  /usr/bin/containerd --config "$pre/config.toml" >"$pre/containerd.log" 2>&1 &
  pid=$!
  for _ in $(seq 60); do [ -S "$sock" ] && break; sleep 0.5; done
  ctr -a "$sock" -n k8s.io images import --label=io.cri-containerd.pinned=pinned --all-platforms --no-unpack --digests \
    "$pre/images.tar" >/dev/null
  n=$(ctr -a "$sock" -n k8s.io images ls -q | grep -v '^sha256:' | grep -vc '@' || true)
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -rf "$pre"
  log "preloaded $n component images into the node's containerd"
}

node_image() {
  local tar cpbin ids s root t0 ctx=$work/ctx
  tar=$(debootstrap_tar node "$NODE_PACKAGES")
  cpbin=$(bash "$repo/hack/build-binaries.sh" kubernetes | tail -1)
  ids=$(component_tags | xargs docker image inspect -f '{{.Id}}')
  s=$( { echo "$tar"; echo "$ids"; cat "$bin/kubelet.stamp" "$bin/kubeadm.stamp" "$cpbin/.kubectl.stamp" \
         "$0" "$here/containerd-config.py" "$here/default-cni.yaml"; } | sha256sum | cut -c1-12)
  if image_fresh "$NODE_IMAGE" "$s"; then log "$NODE_IMAGE up to date (build $s)"; return; fi
  log "assembling $NODE_IMAGE"
  t0=$(date +%s)
  root=$work/node-rootfs
  rm -rf "$root" && mkdir -p "$root" && tar -C "$root" -xf "$tar"
  configure_node "$root"
  install -m 0755 "$bin/kubelet" "$bin/kubeadm" "$cpbin/kubectl" "$root"/usr/bin/
  echo "$K8S_VERSION" >"$root"/kind/version
  sed "s|@CNI_IMAGE@|$CNI_IMAGE|" "$here/default-cni.yaml" >"$root"/kind/manifests/default-cni.yaml
  preload "$root"
  # ENTRYPOINT and ENV by import; STOPSIGNAL by a build (docker 20.10's import refuses it).
  tar -C "$root" -c . | docker import --change 'ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]' \
    --change 'ENV container=docker' - "$NODE_IMAGE-rootfs" >/dev/null
  rm -rf "$root"
  rm -rf "$ctx" && mkdir -p "$ctx"
  printf 'FROM %s\nSTOPSIGNAL SIGRTMIN+3\nLABEL dev.edgeai.build="%s"\n' "$NODE_IMAGE-rootfs" "$s" >"$ctx/Dockerfile"
  DOCKER_BUILDKIT=0 docker build --quiet -t "$NODE_IMAGE" "$ctx" >/dev/null 2>"$work/docker-build.err" \
    || { cat "$work/docker-build.err" >&2; exit 1; }
  rm -rf "$ctx"
  docker rmi "$NODE_IMAGE-rootfs" >/dev/null 2>&1 || true
  log "$NODE_IMAGE built in $(( $(date +%s) - t0 ))s ($(docker image inspect -f '{{.Size}}' "$NODE_IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
}

steps=("$@"); [ ${#steps[@]} -gt 0 ] || steps=(binaries components node)
for step in "${steps[@]}"; do
  case $step in
    binaries) build_binaries ;;
    components) docker_ready; component_images ;;
    node) docker_ready; node_image ;;
    *) echo "node-image: unknown step '$step' (accepted: binaries components node)" >&2; exit 2 ;;
  esac
done
echo "$NODE_IMAGE"
