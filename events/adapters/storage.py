"""A folder of files on a local path or at any fsspec URL (``memory://``, ``s3://``, ``gs://`` ...).

Backups and witness copies go to storage a team already runs, so evp speaks fsspec. Contract:

1. a location without a scheme is a local folder; a URL goes to the fsspec filesystem of its
   scheme (``s3://`` needs ``s3fs`` installed, and takes its endpoint and credentials from
   the usual environment, e.g. ``AWS_ENDPOINT_URL`` for an S3-compatible store);
2. :meth:`Storage.create` writes a file whole or not at all: into a hidden temporary name
   first (fsync'ed and renamed on a local disk; moved on an object store, where a put is
   atomic), and it never replaces a file that exists;
3. :meth:`Storage.names` lists the folder's files, never the hidden temporaries.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from events.adapters.files import write_atomically
from events.errors import ConfigurationError, EvpError, NotFound, ServiceUnavailable


class Storage:
    """The folder at ``location``; see the module docstring."""

    def __init__(self, location: str | Path) -> None:
        self.location = str(location)
        try:
            self._fs, self._root = fsspec.core.url_to_fs(self.location)
        except (ImportError, ValueError) as err:
            raise ConfigurationError(f"storage {self.location!r} cannot be opened: {err}") from err
        self.local = isinstance(self._fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"Storage({self.location!r})"

    def path(self, name: str) -> str:
        return f"{self._root.rstrip('/')}/{name}"

    def describe(self, name: str) -> str:
        """Where ``name`` is, as the user wrote the location."""
        return f"{self.location.rstrip('/')}/{name}"

    def names(self) -> list[str]:
        """Step 3: the files directly in the folder, sorted; none when the folder does not exist yet."""
        try:
            if not self._fs.exists(self._root):
                return []
            entries = self._fs.ls(self._root, detail=False)
        except OSError as err:
            raise ServiceUnavailable("storage", self.location, str(err)) from err
        names = (str(entry).rstrip("/").rsplit("/", 1)[-1] for entry in entries)
        return sorted(n for n in names if not n.startswith("."))

    def exists(self, name: str) -> bool:
        return bool(self._fs.exists(self.path(name)))

    def open(self, name: str) -> IO[bytes]:
        """``name`` for reading; NotFound naming it when it is not there."""
        try:
            return self._fs.open(self.path(name), "rb")  # type: ignore[no-any-return]
        except FileNotFoundError as err:
            raise NotFound(f"{self.describe(name)} does not exist") from err
        except OSError as err:
            raise ServiceUnavailable("storage", self.location, str(err)) from err

    def create(self, name: str, write: Callable[[IO[bytes]], Any]) -> None:
        """Step 2: write ``name`` whole through ``write``; EvpError when it already exists."""
        if self.exists(name):
            raise EvpError(f"{self.describe(name)} already exists; it is never overwritten")
        if self.local:
            self._create_local(name, write)
            return
        temporary = self.path(f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            with self._fs.open(temporary, "wb") as out:
                write(out)
            self._fs.mv(temporary, self.path(name))
        except OSError as err:
            raise ServiceUnavailable("storage", self.location, str(err)) from err
        finally:
            if self._fs.exists(temporary):
                self._fs.rm(temporary)

    def _create_local(self, name: str, write: Callable[[IO[bytes]], Any]) -> None:
        final = Path(self.path(name))
        staged = final.with_name(f".{name}.{uuid.uuid4().hex}.staged")
        write_atomically(staged, write)
        try:
            os.link(staged, final)  # fails if another writer got there first: never a silent overwrite
        except FileExistsError as err:
            raise EvpError(f"{self.describe(name)} already exists; it is never overwritten") from err
        finally:
            staged.unlink(missing_ok=True)
