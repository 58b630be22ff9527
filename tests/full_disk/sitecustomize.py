"""A full disk for the safety tables (tests/safety.py): with PYTHONPATH=tests/full_disk and DDPM_TEST_FULL_DISK=TEXT,
every os.fsync of a file whose path contains TEXT raises OSError(ENOSPC), as a disk that fills up during the write
would. ddpm-lab's output guard (storage.files.write_output) fsyncs every file it writes; a writer that does not
fsync never sees the error, so a test that expects one fails for it, as it should."""
import errno
import os

_FULL = os.environ.get("DDPM_TEST_FULL_DISK")
_fsync = os.fsync


def _full_fsync(fd):
    try:
        name = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        name = ""
    if _FULL in name:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return _fsync(fd)


if _FULL:
    os.fsync = _full_fsync
