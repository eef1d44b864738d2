#!/usr/bin/env python3
"""A process whose name and mapped file name hold terminal control sequences.

It names itself with an escape sequence, a newline and a bell, maps a file
whose name holds the same (and a literal " (deleted)"), writes every page of
it (a private mapping: the pages become its own) and of an anonymous
buffer, then forks. The child writes the first CHILD_PAGES pages of each
and waits; meanwhile the parent writes the last PARENT_PAGES pages of the
anonymous buffer (pages the child does not touch, each copied), then lets
the child exit. Prints one JSON line with what it did. Standard library
only, so that it runs wherever python3 does.

Usage: hostile.py DIR PAGES CHILD_PAGES PARENT_PAGES
"""
import ctypes
import json
import mmap
import os
import sys

NAME = b"\x1b[31mEV\nIL\x07"
FILE_NAME = b"map \x1b[2J\nfile\x07 (deleted)"
PR_SET_NAME = 15
MADV_NOHUGEPAGE = 15


def main():
    directory, pages, child_pages, parent_pages = sys.argv[1], *map(int, sys.argv[2:5])
    if child_pages + parent_pages > pages:
        sys.exit("CHILD_PAGES + PARENT_PAGES must not exceed PAGES")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NAME, ctypes.c_char_p(NAME), 0, 0, 0) != 0:
        sys.exit("prctl failed")
    page = mmap.PAGESIZE
    path = os.path.join(directory.encode(), FILE_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(fd, pages * page)
    filemap = mmap.mmap(fd, pages * page, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    anon = mmap.mmap(-1, pages * page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for m in (filemap, anon):
        # Its own VMA (the flag keeps it from merging with Python's arenas)
        # and 4 KiB pages, so that each write is one copy.
        m.madvise(MADV_NOHUGEPAGE)
        for i in range(pages):
            m[i * page] = 1
    anon_addr = ctypes.addressof(ctypes.c_char.from_buffer(anon))
    done_r, done_w = os.pipe()
    exit_r, exit_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        for m in (filemap, anon):
            for i in range(child_pages):
                m[i * page] = 2
        os.write(done_w, b"x")
        os.read(exit_r, 1)
        os._exit(0)
    os.read(done_r, 1)
    # The child lives and shares these pages: each write copies.
    for i in range(parent_pages):
        anon[(pages - 1 - i) * page] = 3
    os.write(exit_w, b"x")
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"parent": os.getpid(), "child": pid, "name": NAME.decode(),
                      "path": path.decode("utf-8", "surrogateescape"), "anon_addr": anon_addr,
                      "page_size": page, "status": status}), flush=True)


if __name__ == "__main__":
    main()
