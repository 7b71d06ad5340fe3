#!/usr/bin/env bash
# Install the fsl client on a Raspberry Pi (Raspberry Pi OS 64-bit, Debian bookworm, aarch64):
# a virtual environment with the client extra only (torch 2.9.1 CPU, numpy, grpcio, flwr,
# cryptography), the SuperNode's systemd unit and its settings file. Run it as root from a
# checkout of this project:   sudo clients/pi/install.sh
#
#   PREFIX=/opt/fsl      where the virtual environment goes
#   WHEELS=/path/wheels  install offline from a folder of aarch64 wheels (pip download on another host)
#   FSL_FORCE=1          install on a machine that is not aarch64 (for trying the script elsewhere)
set -euo pipefail

SRC=$(cd "$(dirname "$0")/../.." && pwd)
PREFIX=${PREFIX:-/opt/fsl}
ETC=/etc/fsl
STATE=/var/lib/fsl

arch=$(uname -m)
if [[ "$arch" != aarch64 && -z "${FSL_FORCE:-}" ]]; then
    echo "error: this is $arch; the Pi client needs 64-bit Raspberry Pi OS (aarch64). 32-bit (armv7l) has no torch wheels." >&2
    exit 1
fi
python3 - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"error: Python {sys.version.split()[0]}: fsl needs 3.11 or newer (Raspberry Pi OS bookworm ships 3.11)")
PY
if [[ $EUID -ne 0 ]]; then echo "error: run as root (sudo $0)" >&2; exit 1; fi

if ! python3 -c "import venv, ensurepip" 2>/dev/null; then
    apt-get update && apt-get install -y --no-install-recommends python3-venv
fi
id fsl >/dev/null 2>&1 || useradd --system --home-dir "$STATE" --shell /usr/sbin/nologin fsl
install -d -o fsl -g fsl -m 0750 "$STATE"
install -d -m 0755 "$ETC"

python3 -m venv "$PREFIX/venv"
PIP=("$PREFIX/venv/bin/pip" install --disable-pip-version-check)
if [[ -n "${WHEELS:-}" ]]; then PIP+=(--no-index --find-links "$WHEELS"); fi
"${PIP[@]}" --upgrade pip
# Non-editable, client extra only. pyproject.toml pins torch==2.9.1 on aarch64: PyPI's aarch64 wheels of
# 2.11-2.13 are CUDA builds that do not import on a Pi, and 2.10.0 dies with "illegal instruction" on a Pi 4.
"${PIP[@]}" "$SRC[client]"

"$PREFIX/venv/bin/python" - <<'PY'
import flwr, grpc, numpy, torch
import clients.client_app  # the ClientApp imports: fails here, not at the first round, if something is missing
print(f"torch {torch.__version__} (cuda: {torch.cuda.is_available()}), flwr {flwr.__version__}, grpcio {grpc.__version__}, numpy {numpy.__version__}")
x = torch.rand(8, 1, 28, 28, requires_grad=True)
torch.nn.Conv2d(1, 16, 3)(x).sum().backward()  # a real kernel: an illegal-instruction torch dies here
print("torch runs a convolution forward and backward on this CPU")
PY

[[ -f "$ETC/supernode.env" ]] || install -m 0640 -g fsl "$SRC/clients/pi/supernode.env.example" "$ETC/supernode.env"
sed "s|/opt/fsl|$PREFIX|g" "$SRC/clients/pi/fsl-supernode.service" > /etc/systemd/system/fsl-supernode.service
systemctl daemon-reload

cat <<MSG

Installed. Next:
  1. copy this deployment's ca.pem and this node's key:  $ETC/ca.pem, $ETC/node.key (chown root:fsl, chmod 0640)
  2. edit $ETC/supernode.env (SuperLink address, partition, data, threads, batch size, memory budget)
  3. on the SuperLink host: flwr supernode register node-N.pub fsl
  4. systemctl enable --now fsl-supernode && journalctl -u fsl-supernode -f
MSG
