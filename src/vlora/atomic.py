"""Crash-safe file writes: a reader sees the old content or the new, never half of one."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vlora.errors import VLoRAError


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse directory fsync
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and flush it to disk before returning."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def safetensors_blob(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors bytes of ``tensors``. safetensors refuses tensors that share
    storage (one head kept by two tasks, one Gram used for both sides), so a tensor
    whose storage an earlier one already uses is written from a copy."""
    from safetensors.torch import save
    seen: set[int] = set()
    out = {}
    for key, t in tensors.items():
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        out[key] = t.clone() if ptr and ptr in seen else t
        seen.add(ptr)
    return save(out, metadata=metadata)


def read_regular(path: str | os.PathLike, max_bytes: int | None = None) -> bytes:
    """Read a regular file whole. A FIFO, a device (``/dev/zero``) or a file over
    ``max_bytes`` raises OSError instead of blocking or reading without end; the open
    itself never blocks, and no more than the size stat reported is read."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if max_bytes is not None and st.st_size > max_bytes:
            raise OSError(errno.EFBIG, f"{st.st_size} bytes, more than the {max_bytes} allowed",
                          str(path))
        return f.read(st.st_size)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` by writing a sibling temp file and renaming it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        # mkstemp's file is private (0600); the file it replaces gets what open() would give
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_umask())
        fsync_write(Path(tmp), data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def _umask() -> int:
    try:  # Linux states it; setting and restoring it races with other threads
        with open("/proc/self/status") as f:
            return int(next(line.split()[1] for line in f if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    try:
        os.link(src, dst)
    except OSError:  # no hard links on this file system, or someone else's file
        shutil.copy2(src, dst)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the
    system or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = True, keep_others: bool = False
               ) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on success it replaces ``path``.

    With ``keep_others``, what ``path`` held that the temp folder lacks (a README, tokenizer
    files) is linked (or copied, symlinks as symlinks) into it first, so only the files
    written are replaced; otherwise ``path`` is replaced whole. The folder keeps the old
    one's permissions, or gets the umask's (not the temp folder's 0700). On an exception
    (or a crash) ``path`` is left as it was and the temp folder removed.
    """
    path = Path(path).absolute()  # "." has no name to rename; ".." is left to the OS
    if path.exists() and not overwrite:
        raise VLoRAError(f"{path}: already exists (pass overwrite=True to replace it)")
    if path.exists() and not path.is_dir():
        raise VLoRAError(f"{path}: exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o777 & ~_umask())
        if keep_others and path.exists():
            for entry in path.iterdir():
                if (tmp / entry.name).exists() or (tmp / entry.name).is_symlink():
                    continue
                if entry.is_symlink():
                    os.symlink(os.readlink(entry), tmp / entry.name)
                elif entry.is_dir():
                    shutil.copytree(entry, tmp / entry.name, symlinks=True, copy_function=_link_or_copy)
                else:
                    _link_or_copy(entry, tmp / entry.name)
        fsync_dir(tmp)
        # a symlink at path is replaced by the folder (as by the renames), not swapped with it
        if path.exists() and not path.is_symlink() and _exchange(tmp, path):
            shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
        elif path.exists():  # no atomic exchange here: a crash between the renames leaves
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old / "x")  # the old folder in .<name>.*.old/x
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
