"""Ground truth for fork timing: a thread, a clone the kernel refuses, then
N forks, each timed from just before the call to just after it returns in
the parent. Prints one JSON line: the forks with those times.

Usage: forks.py N
"""
import ctypes
import errno
import json
import os
import sys
import threading
import time

SYS_CLONE = 56  # x86-64
CLONE_THREAD = 0x00010000


def main():
    n = int(sys.argv[1])
    # A clone that makes a thread, not a process.
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()
    # A clone refused before any task is made: CLONE_THREAD without
    # CLONE_SIGHAND is EINVAL at the top of copy_process.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    rc = libc.syscall(ctypes.c_long(SYS_CLONE), ctypes.c_ulong(CLONE_THREAD), None, None, None, ctypes.c_ulong(0))
    err = ctypes.get_errno()
    if rc != -1 or err != errno.EINVAL:
        sys.exit(f"the bad clone returned {rc}, errno {err}")
    forks = []
    for _ in range(n):
        before = time.monotonic_ns()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        after = time.monotonic_ns()
        os.waitpid(pid, 0)
        forks.append({"child": pid, "before_ns": before, "after_ns": after})
    print(json.dumps({"forks": forks}), flush=True)


main()
