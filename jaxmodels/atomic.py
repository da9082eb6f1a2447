"""Crash-safe replacement of a file or directory tree (standard library only; re-exported by :mod:`jaxmodels.io`).

Replacing an existing output with two renames (``path -> .old``, ``new -> path``) leaves nothing at ``path`` if the
process dies between them, and the leftover non-empty ``.old`` then blocks the next rename with ENOTEMPTY. Here:

* **Exchange** (Linux >= 3.15, glibc ``renameat2`` or the raw syscall): ``renameat2(src, dst, RENAME_EXCHANGE)``
  swaps the two names in one atomic step, so at every instant ``dst`` is either the complete old or the complete
  new tree; the old tree, now at ``src``, is deleted afterwards (see renameat2(2)).
* **Fallback** (another OS, or a filesystem answering EINVAL/ENOTSUP/ENOSYS): ``dst -> .{name}.old``,
  ``src -> dst``, delete ``.old``. A crash between the two renames leaves the complete old tree at
  ``.{name}.old`` and nothing at ``dst``; :func:`recover_output` (run first by every :class:`AtomicOutput` and
  :func:`atomic_replace` on that path) restores it, and deletes ``.old`` when ``dst`` exists. Every state is
  therefore recoverable to "complete old" or "complete new", never nothing or half.

Durability: every file and directory of the new tree is fsynced before the swap, and the parent directory after
each rename. Writers of outputs in one directory are serialized (``flock`` on the directory) while they recover
and swap; the data itself is written without the lock.

Leftovers of a crashed writer: its staging directory ``.{name}.wl<pid>@<host>-<random>.tmp`` (which may hold the
partial new tree, or the old one after an exchange) is deleted by the next writer of the same path on the same
host once process ``<pid>`` is gone, as are ``.{name}.old`` / ``.{name}.new`` of the two-rename scheme that
``save_checkpoint`` used before.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["AtomicOutput", "atomic_replace", "recover_output", "fsync_dir", "exchange_supported"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_SYS_RENAMEAT2 = {"x86_64": 316, "amd64": 316, "aarch64": 276, "arm64": 276, "riscv64": 276, "ppc64le": 357,
                  "s390x": 347, "i386": 353, "i686": 353}
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}
_USE_EXCHANGE = True  # tests set False to exercise the fallback
_renameat2 = None


def _step(name: str) -> None:
    """Called after each step of a replacement; a no-op (the kill tests replace it to SIGKILL the process)."""


def _load_renameat2():
    """The libc ``renameat2`` (glibc >= 2.28), else ``syscall(SYS_renameat2, ...)``; ``False`` off Linux."""
    global _renameat2
    if _renameat2 is None:
        _renameat2 = False
        if platform.system() == "Linux":
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                try:
                    fn = libc.renameat2
                    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                    fn.restype = ctypes.c_int
                    _renameat2 = fn
                except AttributeError:
                    nr = _SYS_RENAMEAT2.get(platform.machine().lower())
                    if nr is not None:
                        sc = libc.syscall
                        sc.restype = ctypes.c_long
                        _renameat2 = lambda a, s, b, d, f: sc(ctypes.c_long(nr), ctypes.c_int(a), ctypes.c_char_p(s),
                                                              ctypes.c_int(b), ctypes.c_char_p(d), ctypes.c_uint(f))
            except OSError:
                _renameat2 = False
    return _renameat2


def _exchange(src: Path, dst: Path) -> bool:
    """Atomically swap the names ``src`` and ``dst``; False (nothing done) where the OS/filesystem cannot."""
    fn = _load_renameat2() if _USE_EXCHANGE else False
    if not fn:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) {src} <-> {dst}: {os.strerror(err)}")


def exchange_supported(directory: str | os.PathLike) -> bool:
    """Whether ``renameat2(RENAME_EXCHANGE)`` works in ``directory`` (tried on two scratch entries)."""
    d = Path(tempfile.mkdtemp(prefix=".exchange-probe-", dir=directory))
    try:
        (d / "a").mkdir()
        (d / "b").touch()
        return _exchange(d / "a", d / "b") and (d / "a").is_file()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory, so the renames and creations in it survive a power loss (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                _fsync_tree(Path(p))
        fsync_dir(root)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


@contextlib.contextmanager
def _dir_lock(directory: Path) -> Iterator[None]:
    """Exclusive ``flock`` on a directory (serializes recover/swap of writers in it; no lock file is left)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _host() -> str:
    return re.sub(r"\W", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: exists, another user
        return True
    return True


def _recover(path: Path) -> None:
    """:func:`recover_output` with the directory lock held."""
    parent, name = path.parent, path.name
    old, new = parent / f".{name}.old", parent / f".{name}.new"
    if os.path.lexists(old):
        if os.path.lexists(path):
            _remove(old)  # crash after the second rename: the new tree is in place
        else:
            os.rename(old, path)  # crash between the renames: put the complete old tree back
        fsync_dir(parent)
    if os.path.lexists(new) and os.path.lexists(path):
        _remove(new)  # staging of the pre-fix save_checkpoint
    stale = re.compile(rf"^\.{re.escape(name)}\.wl(\d+)@(\w+)-\w+\.tmp$")
    host = _host()
    for entry in parent.iterdir():
        m = stale.match(entry.name)
        if m and m.group(2) == host and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            _remove(entry)


def recover_output(path: str | os.PathLike) -> None:
    """Bring ``path`` back to a complete state after a writer died mid-replacement, and delete its leftovers.

    Restores ``.{name}.old`` when ``path`` is missing (fallback scheme, crash between the renames), deletes it
    when ``path`` exists, and deletes staging directories of dead writers on this host (see the module docstring).
    Called by every writer first; call it yourself before *reading* an output whose writer may have crashed on a
    system without ``RENAME_EXCHANGE``.
    """
    path = Path(path).absolute()
    if path.parent.is_dir():
        with _dir_lock(path.parent):
            _recover(path)


def _swap(src: Path, dst: Path) -> None:
    """Replace ``dst`` by ``src`` (lock held, both complete and fsynced); the old ``dst`` is deleted."""
    if not os.path.lexists(dst):
        os.rename(src, dst)
        fsync_dir(dst.parent)
        _step("renamed")
        return
    if _exchange(src, dst):
        fsync_dir(dst.parent)
        if src.parent != dst.parent:
            fsync_dir(src.parent)
        _step("exchanged")
        _remove(src)  # the old tree (a crash here leaves it in a staging dir: deleted as stale)
        _step("removed_old")
        return
    old = dst.parent / f".{dst.name}.old"
    os.rename(dst, old)
    fsync_dir(dst.parent)
    _step("moved_old")
    os.rename(src, dst)
    fsync_dir(dst.parent)
    _step("renamed")
    _remove(old)
    _step("removed_old")


def atomic_replace(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Replace ``dst`` (file or directory, or nothing) by the complete ``src`` on the same filesystem, crash-safe.

    ``src`` is fsynced first; afterwards ``dst`` holds ``src``'s content, ``src`` is gone and the old ``dst`` is
    deleted. If the process dies in an exchange, the old tree may be left at ``src`` (delete it yourself, or let
    :class:`AtomicOutput` name it so that the next writer does).
    """
    src, dst = Path(src).absolute(), Path(dst).absolute()
    if not os.path.lexists(src):
        raise FileNotFoundError(f"{src}: nothing to move onto {dst}")
    _fsync_tree(src)
    fsync_dir(src.parent)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with _dir_lock(dst.parent):
        _recover(dst)
        _swap(src, dst)
    return dst


class AtomicOutput:
    """Stage an output (file or directory) and put it at ``path`` atomically, or leave ``path`` untouched.

    ::

        with AtomicOutput(path, overwrite=True) as tmp:   # tmp does not exist yet: create a file or directory
            write_everything_into(tmp)
        # here path holds the new output; on an exception (or a crash) it still holds the old one

    or explicitly: ``out = AtomicOutput(path); out.path.mkdir(); ...; out.commit()`` (``out.abort()`` on error).
    Construction recovers ``path`` and deletes leftovers of crashed writers (:func:`recover_output`), then
    raises ``FileExistsError`` if ``path`` exists and ``overwrite`` is False; :meth:`commit` checks that again
    under the lock and swaps as described in the module docstring.
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False):
        self.target = Path(path).absolute()
        self.overwrite = bool(overwrite)
        parent = self.target.parent
        parent.mkdir(parents=True, exist_ok=True)
        with _dir_lock(parent):
            _recover(self.target)
            self._check()
            self._staging = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.wl{os.getpid()}@{_host()}-",
                                                  suffix=".tmp", dir=parent))
        _step("staged")
        self.path = self._staging / self.target.name

    def _check(self) -> None:
        if not self.overwrite and os.path.lexists(self.target):
            raise FileExistsError(errno.EEXIST, "output already exists (pass overwrite=True to replace it)",
                                  str(self.target))

    def commit(self) -> Path:
        if not os.path.lexists(self.path):
            self.abort()
            raise FileNotFoundError(f"{self.target}: nothing was written to the staging path {self.path}")
        _step("written")
        _fsync_tree(self.path)
        fsync_dir(self._staging)
        _step("synced")
        try:
            with _dir_lock(self.target.parent):
                self._check()
                _swap(self.path, self.target)
        except BaseException:
            self.abort()
            raise
        shutil.rmtree(self._staging, ignore_errors=True)
        fsync_dir(self.target.parent)
        _step("done")
        return self.target

    def abort(self) -> None:
        shutil.rmtree(self._staging, ignore_errors=True)

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False
