#!/usr/bin/env bash
# Builds the metabridge container image without any container registry or package index inside
# the build:
#   1. base image ($BASE_IMAGE): a Debian bookworm root filesystem made with mmdebstrap and
#      imported with `docker import`; built only when missing (or when its recipe changed);
#      build base image ($BUILD_BASE_IMAGE): the same plus the C compiler and Python's headers,
#      for the Dockerfile's stage that compiles the in-process mode's Envoy module (the image
#      itself has no compiler); made, labelled and reused the same way;
#   2. wheelhouse (docker/.cache/wheels): the project's runtime dependencies (pyproject.toml,
#      pinned by requirements.txt) and the build tools (docker/build-requirements.txt), fetched on
#      this machine for the base image's Python and platform; refreshed only when those change;
#   3. the image ($IMAGE) from docker/Dockerfile, with the classic builder (BuildKit would try to
#      resolve the local base image in a registry);
#   4. the Prometheus image ($PROMETHEUS_IMAGE) the compose stack scrapes the bridge and Envoy
#      with: Debian's prometheus package in a root filesystem of its own, made like the base
#      image and, like it, built only when missing or when its recipe changed.
# Idempotent: a second run reuses everything that did not change. Prints the image sizes at the end.
#
#   docker/build.sh [--rebuild-base]
#
# Environment: METABRIDGE_IMAGE (default metabridge:latest), METABRIDGE_BASE_IMAGE (default
# metabridge-base:bookworm), METABRIDGE_BUILD_BASE_IMAGE (default metabridge-build-base:bookworm),
# METABRIDGE_PROMETHEUS_IMAGE (default metabridge-prometheus:bookworm),
# METABRIDGE_DEBIAN_MIRROR (a Debian mirror URL for mmdebstrap; its
# default when unset), PYTHON (the Python whose pip downloads the wheels; default: the project's
# .venv, else python3).
set -euo pipefail

cd "$(dirname "$0")/.."
IMAGE=${METABRIDGE_IMAGE:-metabridge:latest}
BASE_IMAGE=${METABRIDGE_BASE_IMAGE:-metabridge-base:bookworm}
BUILD_BASE_IMAGE=${METABRIDGE_BUILD_BASE_IMAGE:-metabridge-build-base:bookworm}
PROMETHEUS_IMAGE=${METABRIDGE_PROMETHEUS_IMAGE:-metabridge-prometheus:bookworm}
[[ "${IMAGE##*/}" == *:* ]] || IMAGE=$IMAGE:latest
STAGE_IMAGE=${IMAGE%:*}-build-stage:${IMAGE##*:}
NATIVE_STAGE_IMAGE=${IMAGE%:*}-native-stage:${IMAGE##*:}
CACHE=docker/.cache
SUITE=bookworm
# libpython3.11 (bookworm's python3 is 3.11): the shared libpython the in-process mode's Envoy
# module embeds; python3 itself does not need it.
BASE_PACKAGES=python3,python3-venv,ca-certificates,libpython3.11
# The compiler and Python's headers, for the module (bridge/native, built with
# `metabridge.native.build`'s flags) only: the stage that uses them is not part of the image.
BUILD_BASE_PACKAGES=$BASE_PACKAGES,gcc,libc6-dev,python3-dev
PROMETHEUS_PACKAGES=prometheus
# Documentation, manuals, translations and recommended packages (prometheus recommends a node
# exporter) are dead weight in a container.
BASE_DPKG_OPTS=(
  --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright'
  --dpkgopt='path-exclude=/usr/share/man/*'
  --dpkgopt='path-exclude=/usr/share/locale/*'
  --aptopt='APT::Install-Recommends "false"'
)
# The extras of the project the image installs (pyproject.toml's optional-dependencies);
# "examples" is what the Dubbo and Thrift backends (tests/peers) import.
IMAGE_EXTRAS=(envoy fast examples)
# The project files the image needs: the source tree minus docs, local state and the tests,
# except tests/peers, the Dubbo and Thrift peers the compose stack runs as example backends.
# (A libmetabridge.so built in the checkout is left out: the image compiles its own.)
SOURCES=(bridge codecs examples proto scripts tests/__init__.py tests/peers pyproject.toml README.md LICENSE)

image_id() { docker image inspect --format '{{.Id}}' "$1" 2>/dev/null || true; }
log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'docker/build.sh: %s\n' "$*" >&2; exit 1; }

rebuild_base=0
for arg in "$@"; do
  case "$arg" in
    --rebuild-base) rebuild_base=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option '$arg' (try --help)" ;;
  esac
done

command -v docker >/dev/null || die "the docker command is not installed; install Docker Engine first"
docker info >/dev/null 2>&1 || die "cannot reach the Docker engine (is dockerd running, and may $(id -un) use it?)"
export DOCKER_BUILDKIT=0

ensure_mmdebstrap() {
  command -v mmdebstrap >/dev/null && return
  [ "$(id -u)" = 0 ] || die "mmdebstrap is needed to build $BASE_IMAGE: run 'apt-get install mmdebstrap' as root, or run this script as root"
  log "installing mmdebstrap"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap debian-archive-keyring >/dev/null
}

rootfs_image() {
  # rootfs_image IMAGE WHAT PACKAGES CHANGE...: a $SUITE root filesystem with PACKAGES, imported
  # as IMAGE with the Dockerfile-style CHANGEs. The label records the recipe, so changing the
  # package list, options or changes rebuilds the image; otherwise an existing one is reused.
  local image=$1 what=$2 packages=$3 recipe current tmp change changes=()
  shift 3
  recipe=$(printf '%s\n' "$SUITE" "$packages" "${BASE_DPKG_OPTS[@]}" "$@" | sha256sum | cut -c1-16)
  current=$(docker image inspect --format '{{ index .Config.Labels "org.metabridge.base-recipe" }}' "$image" 2>/dev/null || true)
  if [ "$rebuild_base" = 0 ] && [ "${force_rootfs:-0}" = 0 ] && [ "$current" = "$recipe" ]; then
    log "$what $image is up to date; reusing it"
    return
  fi
  ensure_mmdebstrap
  [ "$(id -u)" = 0 ] || die "building $image with mmdebstrap needs root"
  log "building $what $image ($SUITE with $packages)"
  mkdir -p "$CACHE"
  tmp=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  trap "rm -rf '$tmp'" EXIT
  # A file, not a pipe: a failed mmdebstrap must never be imported as a truncated image.
  mmdebstrap --quiet --variant=apt --include="$packages" "${BASE_DPKG_OPTS[@]}" \
    "$SUITE" "$tmp/rootfs.tar" ${METABRIDGE_DEBIAN_MIRROR:+"$METABRIDGE_DEBIAN_MIRROR"} \
    || die "mmdebstrap could not build the $SUITE root filesystem (network? set METABRIDGE_DEBIAN_MIRROR to a reachable Debian mirror)"
  for change in "$@"; do changes+=(--change "$change"); done
  docker import "${changes[@]}" --change "LABEL org.metabridge.base-recipe=$recipe" "$tmp/rootfs.tar" "$image" >/dev/null
  rm -rf "$tmp"
  built_rootfs=1
  trap - EXIT
}

build_base() {
  rootfs_image "$BASE_IMAGE" "base image" "$BASE_PACKAGES" \
    'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    'CMD ["/bin/bash"]'
}

build_build_base() {
  # Its recipe names the base image it goes with, so a rebuilt base rebuilds it too.
  rootfs_image "$BUILD_BASE_IMAGE" "build base image" "$BUILD_BASE_PACKAGES" \
    'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    "LABEL org.metabridge.for-base=$(image_id "$BASE_IMAGE")" \
    'CMD ["/bin/bash"]'
}

python_package() { docker run --rm "$1" dpkg-query --showformat '${Version}' --show "libpython3.11"; }

ensure_same_python() {
  # The module is compiled in the build base and run in the base image: both must have the same
  # Python. They differ only when one was made after the mirror had a newer Python (the build
  # base alone was rebuilt); then both are made again, now. Checked when either was just made.
  local base build
  [ "${built_rootfs:-0}" = 1 ] || return 0
  base=$(python_package "$BASE_IMAGE") build=$(python_package "$BUILD_BASE_IMAGE")
  [ "$base" = "$build" ] && return
  log "the base image has libpython3.11 $base, the build base $build: rebuilding both"
  force_rootfs=1 build_base
  force_rootfs=1 build_build_base
  base=$(python_package "$BASE_IMAGE") build=$(python_package "$BUILD_BASE_IMAGE")
  [ "$base" = "$build" ] || die "the base image has libpython3.11 $base and the build base $build, also when both were made now"
}

build_prometheus() {
  # Runs as the prometheus user the package creates, with its data in the container; the
  # compose file mounts the scrape config at /etc/prometheus/prometheus.yml.
  rootfs_image "$PROMETHEUS_IMAGE" "Prometheus image" "$PROMETHEUS_PACKAGES" \
    'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    'USER prometheus' \
    'WORKDIR /var/lib/prometheus' \
    'EXPOSE 9090' \
    'ENTRYPOINT ["/usr/bin/prometheus"]' \
    'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/var/lib/prometheus/metrics2", "--web.listen-address=0.0.0.0:9090"]'
}

host_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"
  elif [ -x .venv/bin/python ]; then echo .venv/bin/python
  else echo python3
  fi
}

runtime_requirements() {
  # What the image runs: the project's dependencies and the extras it uses, from pyproject.toml
  # (requirements.txt also pins test and benchmark tools, which the image does not need).
  "$(host_python)" - "${IMAGE_EXTRAS[@]}" <<'PY' || die "could not read the dependencies from pyproject.toml with $(host_python) (needs Python 3.11+; set PYTHON)"
import sys, tomllib
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
requirements = list(project["dependencies"])
for extra in sys.argv[1:]:
    requirements += project["optional-dependencies"][extra]
print("\n".join(requirements))
PY
}

build_wheelhouse() {
  # Wheels for the base image's interpreter and glibc, whatever this machine runs. Two passes:
  # `pip wheel` resolves the closure here, pinned by requirements.txt (and turns sdist-only
  # packages into wheels); the pure-Python wheels are kept, and every platform-specific one is
  # downloaded again, by exact version, for the image's CPython and manylinux level. The result
  # holds one version of each package, so installing from it needs no further pins.
  local target py abi arch glibc runtime tags=() stamp want m wheel name dist version rest pins=()
  target=$(docker run --rm "$BASE_IMAGE" python3 -c \
    'import platform, sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}", platform.machine(), platform.libc_ver()[1])') \
    || die "cannot run python3 in $BASE_IMAGE (rebuild it with --rebuild-base)"
  read -r py arch glibc <<<"$target"
  abi="cp${py/./}"
  runtime=$(runtime_requirements)

  stamp="$CACHE/wheels/.stamp"
  want=$(printf '%s\n' "$runtime" | cat - requirements.txt docker/build-requirements.txt | sha256sum | cut -c1-16)-$abi-$arch-$glibc
  if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    log "wheelhouse $CACHE/wheels is up to date; reusing it"
    return
  fi
  log "preparing wheels for CPython $py on glibc $glibc $arch in $CACHE/wheels"
  rm -rf "$CACHE/wheels.new" "$CACHE/wheels.host"
  mkdir -p "$CACHE/wheels.new"
  printf '%s\n' "$runtime" >"$CACHE/wheels.new/runtime.txt"
  cp docker/build-requirements.txt "$CACHE/wheels.new/build.txt"
  "$(host_python)" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$CACHE/wheels.host" \
    -r "$CACHE/wheels.new/runtime.txt" -r docker/build-requirements.txt -c requirements.txt \
    || die "pip could not resolve or build the requirements (see above)"
  for wheel in "$CACHE/wheels.host"/*.whl; do
    name=${wheel##*/}
    case "$name" in
      *-none-any.whl) mv "$wheel" "$CACHE/wheels.new/" ;;
      *) IFS=- read -r dist version rest <<<"$name"; pins+=("$dist==$version") ;;
    esac
  done
  for m in $(seq "${glibc#2.}" -1 17); do tags+=(--platform "manylinux_2_${m}_${arch}"); done
  tags+=(--platform "manylinux2014_${arch}" --python-version "$py" --implementation cp --abi "$abi")
  if [ ${#pins[@]} -gt 0 ]; then
    "$(host_python)" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
      "${tags[@]}" --dest "$CACHE/wheels.new" "${pins[@]}" \
      || die "no wheel for CPython $py on glibc $glibc $arch for one of: ${pins[*]} (above: which); the image installs wheels only"
  fi
  rm -rf "$CACHE/wheels.host"
  echo "$want" >"$CACHE/wheels.new/.stamp"
  rm -rf "$CACHE/wheels"
  mv "$CACHE/wheels.new" "$CACHE/wheels"
}

stage_context() {
  # A small build context: sending the repository root would upload .venv and caches.
  local context=$CACHE/context item present=()
  rm -rf "$context"
  mkdir -p "$context/src"
  cp -l -r "$CACHE/wheels" "$context/wheels" 2>/dev/null || cp -r "$CACHE/wheels" "$context/wheels"
  rm -f "$context/wheels/.stamp"
  cp -r docker/bin "$context/bin"
  cp docker/Dockerfile "$context/Dockerfile"
  for item in "${SOURCES[@]}"; do [ -e "$item" ] && present+=("$item"); done
  tar -c --exclude=__pycache__ --exclude='*.pyc' --exclude='libmetabridge.so*' "${present[@]}" \
    | tar -x -C "$context/src"
}

started=$(date +%s)
build_base
build_build_base
ensure_same_python
build_prometheus
build_wheelhouse
stage_context
log "building image $IMAGE"
# The build stages are tagged too ($NATIVE_STAGE_IMAGE, the module's; $STAGE_IMAGE): they are the
# cache of the next build, and tagging them lets the previous ones be removed instead of piling
# up as untagged images.
previous=$(image_id "$IMAGE") previous_stage=$(image_id "$STAGE_IMAGE") previous_native=$(image_id "$NATIVE_STAGE_IMAGE")
build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "BUILD_BASE_IMAGE=$BUILD_BASE_IMAGE")
docker build "${build_args[@]}" --target native --tag "$NATIVE_STAGE_IMAGE" "$CACHE/context" \
  && docker build "${build_args[@]}" --target build --tag "$STAGE_IMAGE" "$CACHE/context" \
  && docker build "${build_args[@]}" --tag "$IMAGE" "$CACHE/context" \
  || die "docker build of $IMAGE failed at the step shown above"
rm -rf "$CACHE/context"
# The replaced images are only wasted disk now (kept while a container still uses one).
current=" $(image_id "$IMAGE") $(image_id "$STAGE_IMAGE") $(image_id "$NATIVE_STAGE_IMAGE") "
for old in "$previous" "$previous_stage" "$previous_native"; do
  if [ -n "$old" ] && [[ "$current" != *" $old "* ]]; then
    docker image rm "$old" >/dev/null 2>&1 || true
  fi
done

log "done in $(($(date +%s) - started)) s"
for image in "$IMAGE" "$BASE_IMAGE" "$BUILD_BASE_IMAGE" "$PROMETHEUS_IMAGE"; do
  printf '%-40s %5d MB\n' "$image" $(($(docker image inspect --format '{{.Size}}' "$image") / 1000000))
done
