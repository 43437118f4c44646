"""The embedded node's data directory, private, and the private files in it.

The directory holds the SQLite database (password hashes, every message) and the token secret
(whoever reads it can sign a token for any user, admin included). Rules:

1. **Created private.** The directory is made 0700 and every file in it 0600 at creation
   (``mkdir(mode=...)``, ``os.open(..., 0o600)``), never made wider and narrowed after: there
   is no moment when another local user could open one. SQLite gives the database's -wal and
   -shm files the database file's mode, so the SQLite adapter creates that file first, 0600
   (``adapters/sqlite/runner.py``, which narrows its own files as rule 2 says).
2. **A file of ours that others may read is narrowed** to 0600, with a warning: the secret
   (here), the database and its -wal and -shm (the adapter). Such a file comes from an older
   chatnode or was copied in; its name says it is ours.
3. **A directory is only warned about.** An existing data directory that others may list
   keeps its mode, with a warning that names the fix: the files in it are private already
   (rules 1 and 2), and the directory may be one the operator shares on purpose (a mount
   point, a home directory), which chatnode does not change behind their back.
4. **A secret appears whole or not at all.** It is written to a private temporary file and
   then linked to its name, which fails if another process made the name meanwhile, whose
   secret is then read: no reader sees half a secret, and two nodes starting on one
   directory use one secret.

Errors are ``OSError`` as the system raised them; the caller names the setting.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
_OTHERS = 0o077  # group and other permission bits


def make_private_dir(path: Path) -> None:
    """Create ``path`` with mode 0700 if it is missing (its missing parents as the umask makes
    them); an existing directory is left as it is (:func:`warn_if_shared`)."""
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(path))
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)


def warn_if_shared(path: Path) -> None:
    """Log a warning when others may list or enter the directory ``path`` (rule 3)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & _OTHERS:
        log.warning(
            "data directory %s has mode %03o: other users can list it (its files are private);"
            " make it private with: chmod 700 %s",
            path,
            mode,
            path,
        )


def narrow_file(path: Path) -> None:
    """Make an existing ``path`` 0600 if others may read it, with a warning (rule 2); a file
    this process may not change keeps its mode, with a warning saying so."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if not mode & _OTHERS:
        return
    try:
        path.chmod(PRIVATE_FILE_MODE)
    except OSError as exc:
        log.warning("%s has mode %03o and stays so: %s", path, mode, exc.strerror)
    else:
        log.warning("%s had mode %03o: made it %03o", path, mode, PRIVATE_FILE_MODE)


def create_private_file(path: Path, data: bytes) -> bool:
    """Make ``path`` a new file holding ``data``, mode 0600, whole or not at all (rule 4):
    False, and nothing changed, if ``path`` exists."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        return True
    finally:
        os.unlink(temporary)
