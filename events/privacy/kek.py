"""Key-encryption keys (KEKs): what wraps the per-subject data keys at rest.

The keyring stores data keys only in wrapped form, so a copy of the key table (or of a
backup) is useless without the KEK. :class:`KeyEncryptionKey` is the port; a KMS such as
HashiCorp Vault's transit engine or a cloud KMS implements the same three members
(``key_id``, ``wrap``, ``unwrap``), binding the subject id as associated data / context,
and the keyring never sees the master key. :class:`LocalKek` is the built-in
implementation: a 32-byte AES-256-GCM key from ``EVP_KEK`` or a private file.

On disk (:class:`KeyFiles`), every KEK lives in a file named by its key id,
``<kek file>.<key id>``, written once (complete, fsynced) and never overwritten; the
configured KEK file is a symbolic link to the current one, switched atomically by
``evp keys rotate`` (a plain file is the current key of a deployment never rotated).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import secrets
import stat
import sys
from pathlib import Path
from collections.abc import Callable
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from events.privacy.cipher import KEY_BYTES, NONCE_BYTES, TAG_BYTES, length_prefixed
from events.errors import ConfigurationError, CryptoError
from events.settings import Settings

_ID_DOMAIN = b"evp-kek-id"
_WRAP_DOMAIN = b"evp-kek-wrap-v1"
_WRAP_VERSION = 1
_KEY_ID_CHARS = 16
#: version (1) | key id (16 ASCII hex) | nonce (12) | wrapped key (32) | tag (16)
_WRAPPED_BYTES = 1 + _KEY_ID_CHARS + NONCE_BYTES + KEY_BYTES + TAG_BYTES


class KeyEncryptionKey(Protocol):
    """Wraps and unwraps data keys; the subject id is authenticated with each one.

    Binding the subject id means a wrapped key copied onto another subject's row fails to
    unwrap, rather than silently decrypting that subject's data with the wrong key.
    ``key_id`` is stable and not secret: the keyring records it next to each wrapped key
    so that a wrong KEK is reported as such, not as corrupt data.
    """

    @property
    def key_id(self) -> str: ...

    def wrap(self, data_key: bytes, *, subject_id: str) -> bytes: ...

    def unwrap(self, wrapped: bytes, *, subject_id: str) -> bytes: ...


def kek_mismatch(subject_id: str, recorded: str, given: str) -> CryptoError:
    """The error for a data key wrapped by another KEK than the one at hand."""
    return CryptoError(
        f"the key-encryption key does not match: the data key of subject {subject_id!r} "
        f"was wrapped by key-encryption key {recorded}, but the key given is {given}"
    )


class LocalKek:
    """An AES-256-GCM key-encryption key held in this process."""

    __slots__ = ("_aead", "_secret", "key_id")

    def __init__(self, secret: bytes) -> None:
        if len(secret) != KEY_BYTES:
            raise ConfigurationError(f"a key-encryption key must be {KEY_BYTES} bytes, got {len(secret)}")
        self._secret = bytes(secret)
        self._aead = AESGCM(self._secret)
        self.key_id: str = hashlib.sha256(_ID_DOMAIN + self._secret).hexdigest()[:_KEY_ID_CHARS]

    def __repr__(self) -> str:  # never show the secret
        return f"LocalKek(key_id={self.key_id!r})"

    @classmethod
    def generate(cls) -> LocalKek:
        return cls(secrets.token_bytes(KEY_BYTES))

    @classmethod
    def from_base64(cls, text: str, *, source: str = "key-encryption key") -> LocalKek:
        """Parse base64 (standard or URL-safe alphabet); ``source`` names where it came from."""
        try:
            secret = base64.b64decode(text.strip().replace("-", "+").replace("_", "/"), validate=True)
        except (binascii.Error, ValueError) as err:
            raise ConfigurationError(f"{source} is not valid base64 ({err})") from err
        if len(secret) != KEY_BYTES:
            raise ConfigurationError(
                f"{source} must hold {KEY_BYTES} bytes in base64, but it decodes to {len(secret)} bytes"
            )
        return cls(secret)

    @classmethod
    def load_or_create(cls, path: Path) -> LocalKek:
        """Read the KEK at ``path``, or create one there (file 0600, new parent dirs 0700).

        Safe against two processes creating it at once: the file appears atomically,
        complete, and the loser reads the winner's key.
        """
        try:
            return cls._load(path)
        except FileNotFoundError:
            pass
        if path.is_symlink():  # the link is there, its key file is not: never create a key behind it
            raise ConfigurationError(
                f"the key-encryption key file {path} points to {os.readlink(path)}, which does not exist"
            )
        _make_private_dirs(path.parent)
        _create_private_file(path, cls.generate().export_base64() + "\n")
        return cls._load(path)

    @classmethod
    def _load(cls, path: Path) -> LocalKek:
        try:
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:
            raise
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigurationError(f"cannot read the key-encryption key file {path}: {err}") from err
        return cls.from_base64(text, source=f"key-encryption key file {path}")

    def export_base64(self) -> str:
        """The secret as base64, for ``EVP_KEK`` or a KEK file. Handle with care."""
        return base64.b64encode(self._secret).decode("ascii")

    def wrap(self, data_key: bytes, *, subject_id: str) -> bytes:
        if len(data_key) != KEY_BYTES:
            raise CryptoError(f"a data key must be {KEY_BYTES} bytes, got {len(data_key)}")
        nonce = os.urandom(NONCE_BYTES)
        header = bytes([_WRAP_VERSION]) + self.key_id.encode("ascii")
        return header + nonce + self._aead.encrypt(nonce, data_key, self._aad(subject_id))

    def unwrap(self, wrapped: bytes, *, subject_id: str) -> bytes:
        if len(wrapped) != _WRAPPED_BYTES or wrapped[0] != _WRAP_VERSION:
            raise CryptoError(
                f"wrapped data key of subject {subject_id!r} is malformed "
                f"({len(wrapped)} bytes, expected {_WRAPPED_BYTES} starting with version {_WRAP_VERSION})"
            )
        recorded = wrapped[1 : 1 + _KEY_ID_CHARS].decode("ascii", errors="replace")
        if recorded != self.key_id:
            raise kek_mismatch(subject_id, recorded, self.key_id)
        nonce = wrapped[1 + _KEY_ID_CHARS : 1 + _KEY_ID_CHARS + NONCE_BYTES]
        body = wrapped[1 + _KEY_ID_CHARS + NONCE_BYTES :]
        try:
            return self._aead.decrypt(nonce, body, self._aad(subject_id))
        except InvalidTag as err:
            raise CryptoError(
                f"wrapped data key of subject {subject_id!r} failed authentication: "
                "it was wrapped for another subject or tampered with"
            ) from err

    def _aad(self, subject_id: str) -> bytes:
        return length_prefixed(_WRAP_DOMAIN, self.key_id, subject_id)


def kek_from_settings(settings: Settings) -> LocalKek:
    """``EVP_KEK`` (base64) if set, else the key file at ``settings.kek_path`` (created if absent).

    A KEK is never created silently: creating one says so once on stderr, with its path
    (never its value). The default one's folder (``<home>/keyring``) is made 0700 and must
    stay so; a KEK file named by ``EVP_KEK_FILE`` is the operator's to place.
    """
    if settings.kek:
        return LocalKek.from_base64(settings.kek, source="EVP_KEK")
    path = settings.kek_path
    default = settings.kek_file is None
    if path.exists():
        if default:
            _check_private_dir(path.parent)
        return LocalKek.load_or_create(path)
    _make_private_dirs(path.parent)
    if default:
        _check_private_dir(path.parent)
    kek = LocalKek.load_or_create(path)
    print(f"evp: created a new key-encryption key at {path}: every personal field is wrapped under it; back it up "
          "apart from the data (or set EVP_KEK / EVP_KEK_FILE to an existing one)", file=sys.stderr)
    return kek


def _check_private_dir(directory: Path) -> None:
    """ConfigurationError if others may enter or list the KEK's folder."""
    mode = stat.S_IMODE(directory.stat().st_mode)
    if mode & 0o077:
        raise ConfigurationError(
            f"the key-encryption key's folder {directory} has mode {mode:04o}: it must be private (chmod 700 {directory})"
        )


#: Finds a KEK by key id, or None: how a :class:`~events.privacy.keyring.Keyring` follows a rotation.
KekFinder = Callable[[str], KeyEncryptionKey | None]


def kek_finder(settings: Settings, *pointers: Path) -> KekFinder:
    """Find a KEK by id in ``EVP_KEK``, then in the key files beside ``settings.kek_path`` and ``pointers``.

    Never creates a key. Pass it to ``Keyring(find_kek=...)`` so that a process started
    before ``evp keys rotate`` loads the new KEK instead of being refused.
    """
    places = [KeyFiles(p) for p in dict.fromkeys((settings.kek_path, *pointers))]

    def find(key_id: str) -> KeyEncryptionKey | None:
        if settings.kek:
            given = LocalKek.from_base64(settings.kek, source="EVP_KEK")
            if given.key_id == key_id:
                return given
        for files in places:
            found = files.load(key_id)
            if found is not None:
                return found
        return None

    return find


class KeyFiles:
    """The KEK files of one deployment: ``<pointer>.<key id>`` per key, ``<pointer>`` for the current one.

    A key file is created once — complete, 0600, fsynced with its folder — and never
    overwritten or replaced; :meth:`retire` deletes one for good. ``<pointer>`` is what
    :func:`kek_from_settings` reads: a symbolic link to the current key file after a
    rotation (:meth:`point_to` switches it atomically), or a plain key file before one.
    """

    def __init__(self, pointer: Path) -> None:
        self.pointer = Path(pointer)

    def path_of(self, key_id: str) -> Path:
        return self.pointer.with_name(f"{self.pointer.name}.{key_id}")

    def write(self, kek: LocalKek) -> Path:
        """Store ``kek`` in its own file, unless that file exists and holds it already."""
        path = self.path_of(kek.key_id)
        _make_private_dirs(path.parent)
        _create_private_file(path, kek.export_base64() + "\n")
        _fsync_directory(path.parent)
        written = LocalKek._load(path)
        if written.key_id != kek.key_id:
            raise CryptoError(f"key file {path} holds key-encryption key {written.key_id}, not {kek.key_id}")
        return path

    def load(self, key_id: str) -> LocalKek | None:
        """The KEK ``key_id`` from its own file or from the pointer, or None if neither holds it."""
        for path in (self.path_of(key_id), self.pointer):
            try:
                found = LocalKek._load(path)
            except (FileNotFoundError, ConfigurationError):
                continue
            if found.key_id == key_id:
                return found
        return None

    def current(self) -> LocalKek | None:
        """The KEK the pointer names, or None when there is no pointer (never creates one)."""
        try:
            return LocalKek._load(self.pointer)
        except FileNotFoundError:
            return None

    def unused(self, known: set[str]) -> list[LocalKek]:
        """Key files beside the pointer whose ids are not in ``known``, newest first."""
        prefix = self.pointer.name + "."
        found: list[tuple[float, LocalKek]] = []
        if not self.pointer.parent.is_dir():
            return []
        for path in self.pointer.parent.iterdir():
            key_id = path.name[len(prefix):]
            if not path.name.startswith(prefix) or len(key_id) != _KEY_ID_CHARS or key_id in known:
                continue
            kek = self.load(key_id)
            if kek is not None:
                found.append((path.stat().st_mtime, kek))
        return [kek for _, kek in sorted(found, key=lambda item: -item[0])]

    def point_to(self, key_id: str) -> None:
        """Make the pointer a link to ``key_id``'s file, atomically; its old target is left alone."""
        target = self.path_of(key_id)
        if self.load(key_id) is None or not target.exists():
            raise CryptoError(f"cannot switch {self.pointer} to key-encryption key {key_id}: {target} does not hold it")
        if self.pointer.is_symlink() and os.readlink(self.pointer) == target.name:
            return
        temporary = self.pointer.with_name(f".{self.pointer.name}.{secrets.token_hex(6)}.link")
        try:
            os.symlink(target.name, temporary)
            os.replace(temporary, self.pointer)
        except OSError as err:
            raise ConfigurationError(f"cannot switch {self.pointer} to {target.name}: {err}") from err
        finally:
            temporary.unlink(missing_ok=True)
        _fsync_directory(self.pointer.parent)

    def retire(self, key_id: str) -> list[Path]:
        """Delete every file holding ``key_id`` here (its own file, the pointer if it still is one, and any
        temporary copy a killed writer left); returns them.

        Refuses while the pointer links to that key: the current key is never retired.
        """
        if self.pointer.is_symlink() and os.readlink(self.pointer) == self.path_of(key_id).name:
            raise CryptoError(f"{self.pointer} still links to key-encryption key {key_id}: it cannot be retired")
        removed: list[Path] = []
        own = self.path_of(key_id)
        # A process killed between writing a key file's temporary copy and unlinking it
        # leaves `.kek.<id>.<random>.tmp` behind: a second copy of the key to retire.
        leftovers = sorted(own.parent.glob(f".{own.name}.*.tmp")) + sorted(own.parent.glob(f".{self.pointer.name}.*.tmp"))
        for path in (own, self.pointer, *leftovers):
            try:
                holds = LocalKek._load(path).key_id == key_id
            except (FileNotFoundError, ConfigurationError):
                continue
            if holds:
                path.unlink(missing_ok=True)
                removed.append(path)
        if removed:
            _fsync_directory(self.pointer.parent)
        return removed


def _fsync_directory(directory: Path) -> None:
    """Make a new name in ``directory`` survive a crash."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_private_dirs(directory: Path) -> None:
    """Create ``directory`` and missing parents as 0700; leave existing ones alone."""
    missing: list[Path] = []
    for candidate in (directory, *directory.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue
        except OSError as err:
            raise ConfigurationError(f"cannot create the key directory {path}: {err}") from err
        path.chmod(0o700)  # mkdir's mode is filtered by the umask


def _create_private_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (0600) unless it exists; never leave a partial file there."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):  # another process won: use its key
            os.link(temporary, path)  # atomic create-if-absent, content complete
    except OSError as err:
        raise ConfigurationError(f"cannot create the key-encryption key file {path}: {err}") from err
    finally:
        temporary.unlink(missing_ok=True)
