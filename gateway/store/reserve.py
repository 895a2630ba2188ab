"""A disk reserve: a file of zeros beside the store, given back when the disk is full.

On a full file system SQLite cannot even write the lease, the DELETE or the checkpoint that
would free space, so a store that filled its disk could never drain again. The store keeps
``RESERVE_BYTES`` (at most a tenth of the file system) in ``<store>.reserve``; on
SQLITE_FULL it deletes that file, checkpoints and retries, which leaves room to forward and
delete messages. The reserve is taken again (on the retention timer) once the file system
has twice its size free.

The released reserve is enough only if the WAL's committed content fits in it: the store
sizes ``wal_autocheckpoint`` and its transactions from ``planned_size`` (see db.py,
invariant 5), and refuses appends without writing for a while after SQLITE_FULL.
"""

from __future__ import annotations

import contextlib
import logging
import os

log = logging.getLogger("gateway.store")

RESERVE_BYTES = 8 * 1024**2
_CHUNK = b"\0" * (1024 * 1024)


class DiskReserve:
    def __init__(self, path: str, size: int = RESERVE_BYTES) -> None:
        self.path = path
        self.size = size

    def held(self) -> bool:
        return os.path.exists(self.path)

    def _statvfs(self) -> os.statvfs_result:
        return os.statvfs(os.path.dirname(os.path.abspath(self.path)))

    def _fit(self, st: os.statvfs_result) -> int:
        """A tenth of a small file system at most (a 64 MB partition gets 6.4 MB)."""
        return min(self.size, st.f_blocks * st.f_frsize // 10)

    def planned_size(self) -> int:
        """The reserve's size on this file system."""
        if self.size <= 0:
            return 0
        try:
            return self._fit(self._statvfs())
        except OSError:
            return self.size

    def would_fit(self, freed: int) -> bool:
        """Whether ``freed`` more free bytes would let ``ensure`` take the reserve."""
        try:
            st = self._statvfs()
        except OSError:
            return False
        return st.f_bavail * st.f_frsize + freed >= 2 * self._fit(st)

    def ensure(self) -> bool:
        """Take the reserve when it is missing and the file system has room for it twice."""
        if self.size <= 0 or self.held():
            return self.held()
        try:
            st = self._statvfs()
            size = self._fit(st)
            if st.f_bavail * st.f_frsize < 2 * size:
                return False
            with open(self.path + ".tmp", "wb") as fh:
                for start in range(0, size, len(_CHUNK)):
                    fh.write(_CHUNK[:min(len(_CHUNK), size - start)])
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(self.path + ".tmp", self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(self.path + ".tmp")
            log.warning("cannot take the %d-byte disk reserve at %s: %s", self.size, self.path, exc)
            return False
        return True

    def release(self) -> bool:
        """Give the reserve back to the file system; True when there was one."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.error("cannot release the disk reserve %s: %s", self.path, exc)
            return False
        log.warning("disk full: released the disk reserve %s so the store can drain", self.path)
        return True
