#!/usr/bin/env bash
# The Raspberry Pi path, proven on an x86-64 Linux machine (issue 15, point 5).
#
# Builds a 64-bit ARM (arm64) Debian userland from Debian's own packages, runs it under
# qemu-user (proot -q qemu-aarch64-static: no binfmt registration, the host kernel's settings
# are left alone), copies this checkout into it and does what the README tells a Raspberry Pi
# user to do: `make demo` (a venv, `pip install -e .` with the runtime only, examples/demo.py).
# Optionally also runs the int8 exactness tests (tests/test_int8_gemm.py) with ONNX Runtime's
# ARM kernels. Emulated: this proves installability and correctness, not speed.
#
#   tools/arm64-check.sh [--cache DIR] [--objects N] [--tests] [--no-demo] [--shell]
#
# Idempotent: the rootfs is built once into the cache dir (default /var/tmp/d2r-arm64, outside
# the repository) and reused; the guest's copy of the checkout is refreshed on every run (its
# .venv is kept, so a rerun does not download the wheels again).
# Host needs (Debian/Ubuntu, as root: debootstrap's first stage writes device files):
#   apt-get install -y debootstrap qemu-user-static proot
# and HTTP(S) access to a Debian mirror and to PyPI.
set -euo pipefail
{ # the whole script is one block: bash reads it all before running, so editing or updating the
  # file during a run (which takes long) cannot change what this run does

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${D2R_ARM64_CACHE:-/var/tmp/d2r-arm64}
SUITE=${D2R_ARM64_SUITE:-bookworm}
MIRROR=${D2R_ARM64_MIRROR:-}
OBJECTS=${D2R_ARM64_OBJECTS:-}
# The emulated core: a Raspberry Pi 4's Cortex-A72 (ARMv8.0: no dot product, no fp16 arithmetic)
# is the oldest instruction set we claim. Pi 5: cortex-a76; Jetson Orin (A78AE) is close to a76.
CPU=${D2R_ARM64_CPU:-cortex-a72}
TEST_CPUS=${D2R_ARM64_TEST_CPUS:-cortex-a72 cortex-a76 max}
TEST_FILES=${D2R_ARM64_TEST_FILES:-tests/test_int8_gemm.py}
RUN_DEMO=1
RUN_TESTS=0
OPEN_SHELL=0
MARK=.d2r-arm64-rootfs   # our marker: we only ever delete inside a rootfs that carries it

usage() { sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; cat <<EOF
Options:
  --cache DIR     where the arm64 rootfs lives (default $CACHE; env D2R_ARM64_CACHE)
  --suite NAME    Debian release of the guest (default $SUITE; Raspberry Pi OS 12 is bookworm)
  --mirror URL    Debian mirror (default: the host's apt source, else http://deb.debian.org/debian)
  --cpu NAME      the emulated ARM core for the demo (default $CPU = Raspberry Pi 4; see
                  qemu-aarch64-static -cpu help: cortex-a76 = Pi 5, max = every extension)
  --test-cpus "A B"  the cores --tests runs on (default "$TEST_CPUS": NEON only, + dot
                  product, + i8mm/SVE; ONNX Runtime chooses its int8 GEMM kernel by these)
  --objects N     a reduced demo: index and query only the first N of its 8 objects (3 photos
                  and 1 visitor each). The full demo takes about 1.5 hours emulated here.
  --tests         also run the --test-files in the guest on each --test-cpus core (installs
                  the onnx extra, onnx and pytest into the guest's .venv)
  --test-files "F G"  the test files --tests runs (default "$TEST_FILES"; no test needing
                  ../shared or the test extra's OpenCV/scikit-image)
  --no-demo       skip the demo (e.g. with --tests)
  --shell         open a shell in the guest at the end
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --cache) CACHE=$2; shift 2 ;;
        --suite) SUITE=$2; shift 2 ;;
        --mirror) MIRROR=$2; shift 2 ;;
        --objects) OBJECTS=$2; shift 2 ;;
        --cpu) CPU=$2; shift 2 ;;
        --test-cpus) TEST_CPUS=$2; shift 2 ;;
        --test-files) TEST_FILES=$2; shift 2 ;;
        --tests) RUN_TESTS=1; shift ;;
        --no-demo) RUN_DEMO=0; shift ;;
        --shell) OPEN_SHELL=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "arm64-check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

say() { printf '[arm64-check %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() { printf '[arm64-check] error: %s\n' "$*" >&2; exit 1; }
elapsed() { local s=$(( $(date +%s) - $1 )); printf '%dm%02ds' $((s / 60)) $((s % 60)); }

if [ -n "$OBJECTS" ] && ! [[ "$OBJECTS" =~ ^[1-8]$ ]]; then
    die "--objects must be a whole number from 1 to 8, got '$OBJECTS'"
fi

# ---- host tools ---------------------------------------------------------------------------
missing=()
for tool in debootstrap proot qemu-aarch64-static git tar python3; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    die "missing host tools: ${missing[*]}. Install them with: apt-get install -y debootstrap qemu-user-static proot git tar"
fi
[ "$(uname -m)" = x86_64 ] || die "this emulates arm64 on an x86-64 host; on an arm64 machine run 'make demo' directly"
[ "$(id -u)" = 0 ] || die "debootstrap's first stage needs root (run as root, e.g. sudo $0)"

if [ -z "$MIRROR" ]; then
    # the host's own Debian source, so that a machine behind a mirror uses it
    MIRROR=$(grep -h -E '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
             /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -o -E 'https?://[^ ]*/debian/?' | head -n 1 || true)
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi

ROOT=$CACHE/rootfs
mkdir -p "$CACHE"
if [ -e "$ROOT" ] && [ ! -e "$ROOT/$MARK" ] && [ -n "$(ls -A "$ROOT" 2>/dev/null)" ]; then
    die "$ROOT exists and was not made by this script (no $MARK in it): choose another --cache"
fi

# Run a command in the guest: arm64 binaries through qemu-user, as (fake) root, with a clean
# environment plus the host's pip settings (see copy_pip_settings). proot 5.1 does not translate
# the paths of statx, faccessat2, openat2 and execveat (newer than it): without the ENOSYS filter
# of tools/enosys_exec.py they would look at the host's files (see there).
ENOSYS=(python3 "$REPO/tools/enosys_exec.py" statx,faccessat2,openat2,execveat --)
GUEST_ENV=(HOME=/root LANG=C.UTF-8 TERM=dumb QEMU_CPU="$CPU" PYTHONUNBUFFERED=1
           PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
           SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
           PIP_CERT=/etc/ssl/certs/ca-certificates.crt)
guest() {
    env -i "${GUEST_ENV[@]}" "${ENOSYS[@]}" proot -q qemu-aarch64-static -0 -r "$ROOT" \
        -b /dev -b /proc -b /sys -w /root "$@"
}

T_ALL=$(date +%s)

# ---- 1. rootfs: debootstrap, first stage on the host, second stage emulated ----------------
PACKAGES=python3,python3-venv,make
if [ ! -e "$ROOT/.d2r-stage2-done" ]; then
    if [ ! -e "$ROOT/.d2r-stage1-done" ]; then
        if [ -e "$ROOT" ]; then
            [ -e "$ROOT/$MARK" ] || [ -z "$(ls -A "$ROOT")" ] || die "refusing to reuse $ROOT"
            say "removing the unfinished rootfs $ROOT (made by an interrupted earlier run)"
            rm -rf --one-file-system "$ROOT"
        fi
        mkdir -p "$ROOT"; touch "$ROOT/$MARK"
        t=$(date +%s)
        say "debootstrap stage 1: arm64 $SUITE minbase from $MIRROR into $ROOT"
        debootstrap --arch=arm64 --foreign --variant=minbase --include="$PACKAGES" \
            "$SUITE" "$ROOT" "$MIRROR" || die "debootstrap stage 1 failed (see $ROOT/debootstrap/debootstrap.log)"
        # In a container debootstrap links proc -> /proc, which proot cannot bind over.
        if [ -L "$ROOT/proc" ]; then rm "$ROOT/proc"; mkdir "$ROOT/proc"; fi
        touch "$ROOT/.d2r-stage1-done"
        say "stage 1 done in $(elapsed "$t")"
    fi
    t=$(date +%s)
    say "debootstrap stage 2 under qemu-aarch64 (slow: every package is configured emulated)"
    cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
    guest /debootstrap/debootstrap --second-stage \
        || die "debootstrap stage 2 failed (see $ROOT/debootstrap/debootstrap.log; to start over: rm -rf $ROOT)"
    touch "$ROOT/.d2r-stage2-done"
    say "stage 2 done in $(elapsed "$t")"
else
    say "reusing the arm64 rootfs in $ROOT"
fi
arch=$(guest uname -m)
[ "$arch" = aarch64 ] || die "the guest reports machine '$arch', expected aarch64"
say "guest: $(guest sh -c '. /etc/os-release; echo "$PRETTY_NAME"'), $arch, $(guest python3 --version)"

# ---- 2. network settings: DNS, the host's CA bundle and pip configuration ------------------
# The guest gets its wheels from the network as a Raspberry Pi would. pip settings that name
# host-local folders (find-links, file:// indexes: x86 wheel mirrors of this host) are left out;
# files they name (a constraints file) are copied to the same path in the guest.
local_path() { local v=${1#file://}; [ "${v:0:1}" = / ]; }
copy_pip_settings() {
    cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
    # the host's CA bundle (it may hold a proxy's CA) at the guest's standard path
    local ca
    for ca in "${PIP_CERT:-}" "${SSL_CERT_FILE:-}" "${REQUESTS_CA_BUNDLE:-}" /etc/ssl/certs/ca-certificates.crt; do
        if [ -n "$ca" ] && [ -f "$ca" ]; then
            mkdir -p "$ROOT/etc/ssl/certs"
            cp "$ca" "$ROOT/etc/ssl/certs/ca-certificates.crt"
            break
        fi
    done
    local f line key val tok kept dest
    local -; set -f   # the values are split on blanks, never globbed
    for f in /etc/pip.conf /etc/xdg/pip/pip.conf "$HOME/.pip/pip.conf" "$HOME/.config/pip/pip.conf"; do
        [ -f "$f" ] || continue
        dest=$ROOT${f/#$HOME//root}
        mkdir -p "$(dirname "$dest")"
        : > "$dest"
        while IFS= read -r line || [ -n "$line" ]; do
            if [[ "$line" =~ ^[[:space:]]*([A-Za-z_-]+)[[:space:]]*=[[:space:]]*(.*)$ ]]; then
                key=${BASH_REMATCH[1]}; val=${BASH_REMATCH[2]}; kept=()
                for tok in $val; do
                    if [ "$key" = cert ]; then tok=/etc/ssl/certs/ca-certificates.crt
                    elif local_path "$tok"; then
                        tok=${tok#file://}
                        if [ -f "$tok" ]; then mkdir -p "$(dirname "$ROOT$tok")"; cp "$tok" "$ROOT$tok"; else continue; fi
                    fi
                    kept+=("$tok")
                done
                if [ ${#kept[@]} -gt 0 ]; then printf '%s = %s\n' "$key" "${kept[*]}" >> "$dest"; fi
            else
                printf '%s\n' "$line" >> "$dest"
            fi
        done < "$f"
    done
    # PIP_* variables of this shell (index URLs, timeouts) and proxies, the same way
    local var
    while IFS='=' read -r var _; do
        case "$var" in
            PIP_CERT) ;;   # already the copied bundle
            PIP_*) kept=()
                   for tok in ${!var}; do local_path "$tok" || kept+=("$tok"); done
                   if [ ${#kept[@]} -gt 0 ]; then GUEST_ENV+=("$var=${kept[*]}"); fi ;;
            HTTP_PROXY|HTTPS_PROXY|NO_PROXY|http_proxy|https_proxy|no_proxy) GUEST_ENV+=("$var=${!var}") ;;
        esac
    done < <(env)
    return 0
}
copy_pip_settings
# qemu-user 7.2 shows the guest the host's x86 /proc/cpuinfo. LiteRT's XNNPACK (through the cpuinfo
# library) then finds no ARM core and crashes (SIGSEGV creating any interpreter). A Raspberry Pi
# shows its own cores there, so we bind an ARM /proc/cpuinfo for the emulated core: the MIDR fields
# of that core and the Features of the HWCAP bits qemu gives the guest, one entry per host CPU.
cpuinfo_file() {
    local cpu=$1 f=$CACHE/proc/cpuinfo-$1 midr features n p
    if [ ! -s "$f" ]; then
        case "$cpu" in   # implementer variant part revision (Arm's MIDR values of each core)
            cortex-a53) midr="0x41 0x0 0xd03 4" ;;
            cortex-a57) midr="0x41 0x1 0xd07 1" ;;
            cortex-a72) midr="0x41 0x0 0xd08 3" ;;   # Raspberry Pi 4 (BCM2711)
            cortex-a76) midr="0x41 0x4 0xd0b 1" ;;   # Raspberry Pi 5 (BCM2712)
            neoverse-n1) midr="0x41 0x4 0xd0c 1" ;;
            *) midr="0x00 0x0 0x000 0" ;;            # max, a64fx: no specific core
        esac
        features=$(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin QEMU_CPU="$cpu" "${ENOSYS[@]}" proot -q qemu-aarch64-static -r "$ROOT" -w / /usr/bin/python3 -c '
import ctypes
names = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc "
         "dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg").split()
names2 = ("dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm svef64mm "
          "svebf16 i8mm bf16 dgh rng bti mte").split()
libc = ctypes.CDLL(None); libc.getauxval.restype = ctypes.c_ulong
h1, h2 = libc.getauxval(16), libc.getauxval(26)
print(" ".join([n for i, n in enumerate(names) if h1 >> i & 1] + [n for i, n in enumerate(names2) if h2 >> i & 1]))') \
            || die "cannot read the HWCAP of an emulated $cpu (is '$cpu' in qemu-aarch64-static -cpu help?)"
        set -- $midr
        n=$(getconf _NPROCESSORS_CONF)
        mkdir -p "$CACHE/proc"
        for ((p = 0; p < n; p++)); do
            printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: %s\nCPU architecture: 8\nCPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %s\n\n' \
                "$p" "$features" "$1" "$2" "$3" "$4"
        done > "$f.tmp" && mv "$f.tmp" "$f"
    fi
    printf '%s' "$f"
}
guest_repo() {   # GUEST_CPU=name guest_repo ... : on another emulated core
    local cpuinfo; cpuinfo=$(cpuinfo_file "${GUEST_CPU:-$CPU}")
    env -i "${GUEST_ENV[@]}" QEMU_CPU="${GUEST_CPU:-$CPU}" "${ENOSYS[@]}" proot -q qemu-aarch64-static -0 -r "$ROOT" \
        -b /dev -b /proc -b /sys -b "$cpuinfo:/proc/cpuinfo" -w /root/d2r "$@"
}

# the ARM /proc/cpuinfo of every core this run emulates (made once, here, where errors stop the run)
for c in $CPU $([ "$RUN_TESTS" = 1 ] && echo "$TEST_CPUS"); do cpuinfo_file "$c" > /dev/null; done

# ---- 3. the checkout, as a user's clone: tracked and untracked-but-not-ignored files --------
t=$(date +%s)
DEST=$ROOT/root/d2r
mkdir -p "$DEST"
# Everything but the guest's own .venv is ours to replace (this folder lives in our rootfs).
find "$DEST" -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf --one-file-system {} +
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
    | tar --null -T - -cf -) | tar -xf - -C "$DEST"
say "copied the checkout ($(cd "$REPO" && git describe --always --dirty)) to the guest's /root/d2r in $(elapsed "$t")"

status=0
# ---- 4. make demo: the README's first command ---------------------------------------------
if [ "$RUN_DEMO" = 1 ]; then
    t=$(date +%s)
    demo_args=""
    [ -n "$OBJECTS" ] && demo_args="--objects $OBJECTS"
    say "make demo${demo_args:+ DEMO_ARGS='$demo_args'} in the guest on an emulated $CPU (venv + pip install -e . + examples/demo.py)"
    if guest_repo make demo DEMO_ARGS="$demo_args"; then
        say "make demo passed in $(elapsed "$t")"
    else
        status=1; say "make demo FAILED after $(elapsed "$t")"
    fi
    guest_repo .venv/bin/python -c 'import platform, numpy, numba, PIL, ai_edge_litert, d2r
print("guest runtime:", platform.machine(), "python", platform.python_version(), "numpy", numpy.__version__,
      "numba", numba.__version__, "pillow", PIL.__version__, "d2r", d2r.__version__, "from", d2r.__file__)' || status=1
fi

# ---- 5. int8 exactness on ARM: tests/test_int8_gemm.py with ONNX Runtime's arm64 kernels ----
if [ "$RUN_TESTS" = 1 ]; then
    t=$(date +%s)
    say "$TEST_FILES in the guest (onnx extra, onnx, pytest)"
    if [ ! -x "$DEST/.venv/bin/python" ]; then
        guest_repo python3 -m venv .venv && guest_repo .venv/bin/python -m pip install --quiet --upgrade pip || status=1
    fi
    if guest_repo .venv/bin/python -m pip install --quiet -e ".[onnx]" "onnx==1.23.*" "pytest>=7" "hypothesis>=6"; then
        for c in $TEST_CPUS; do
            t1=$(date +%s)
            if GUEST_CPU=$c guest_repo .venv/bin/python -c 'import onnxruntime, numpy; from d2r import int8_gemm
print("int8 backend:", int8_gemm.backend(), "onnxruntime", onnxruntime.__version__, "numpy", numpy.__version__)' \
                && GUEST_CPU=$c guest_repo .venv/bin/python -m pytest -q -p no:cacheprovider $TEST_FILES; then
                say "tests passed on emulated $c in $(elapsed "$t1")"
            else
                status=1; say "tests FAILED on emulated $c after $(elapsed "$t1")"
            fi
        done
    else
        status=1; say "pip install -e '.[onnx]' onnx pytest hypothesis FAILED in the guest"
    fi
    say "tests done in $(elapsed "$t")"
fi

if [ "$OPEN_SHELL" = 1 ]; then
    say "a shell in the guest (exit to leave)"
    guest_repo /bin/bash || true
fi

if [ "$status" = 0 ]; then
    say "PASSED: arm64 (emulated) in $(elapsed "$T_ALL")"
else
    say "FAILED: arm64 (emulated) after $(elapsed "$T_ALL"); the rootfs stays in $ROOT for a look (--shell)"
fi
exit "$status"
}
