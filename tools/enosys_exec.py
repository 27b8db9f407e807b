#!/usr/bin/env python3
"""Run a command in which some system calls answer ENOSYS ("not implemented"), x86-64 Linux only.

    python3 tools/enosys_exec.py statx,faccessat2 -- proot -q qemu-aarch64-static ...

Why (tools/arm64-check.sh): proot 5.1 (Debian 12's) translates the paths of the system calls it
knows and lets the others through untouched. qemu-user passes a guest's statx and faccessat2 on
as the host's statx and faccessat2, which proot 5.1 does not know: they then look at the *host's*
files (in the arm64 guest `test -x /debootstrap/debootstrap` is false, `ls` shows host files).
Answering ENOSYS makes qemu (statx) and the guest's glibc (faccessat2) fall back to the older
calls that proot translates. This is a seccomp filter on this process and its children only
(with no_new_privs): nothing of the host kernel's settings changes.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys

# x86-64 numbers (arch/x86/entry/syscalls/syscall_64.tbl)
SYSCALLS = {"execveat": 322, "statx": 332, "openat2": 437, "faccessat2": 439}

AUDIT_ARCH_X86_64 = 0xC000003E
BPF_LD_W_ABS, BPF_JEQ_K, BPF_RET_K = 0x20, 0x15, 0x06
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


def program(numbers: list[int]) -> list[tuple[int, int, int, int]]:
    """Classic BPF: on x86-64, each listed call returns -ENOSYS; everything else is allowed."""
    n = len(numbers)
    prog = [(BPF_LD_W_ABS, 0, 0, 4),                      # seccomp_data.arch
            (BPF_JEQ_K, 0, n + 1, AUDIT_ARCH_X86_64),      # another ABI: allow
            (BPF_LD_W_ABS, 0, 0, 0)]                       # seccomp_data.nr
    for i, nr in enumerate(numbers):                       # match: jump to the ENOSYS return
        prog.append((BPF_JEQ_K, n - i, 0, nr))
    prog.append((BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    prog.append((BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.ENOSYS))
    return prog


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        print(f"enosys_exec: only for x86-64 Linux, this is {platform.system()} {platform.machine()}", file=sys.stderr)
        return 2
    names = [s for s in argv[0].split(",") if s]
    unknown = [s for s in names if s not in SYSCALLS]
    if unknown:
        print(f"enosys_exec: unknown system call(s) {', '.join(unknown)}; known: {', '.join(SYSCALLS)}", file=sys.stderr)
        return 2
    insns = program([SYSCALLS[s] for s in names])
    filt = (SockFilter * len(insns))(*[SockFilter(*i) for i in insns])
    fprog = SockFprog(len(insns), filt)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.cast(ctypes.pointer(fprog), ctypes.c_void_p), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")
    cmd = argv[2:]
    try:
        os.execvp(cmd[0], cmd)
    except OSError as exc:
        print(f"enosys_exec: cannot run {cmd[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
