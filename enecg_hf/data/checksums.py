"""Content hashes of the files of a saved dataset folder, so that a folder changed after it was built (a file
truncated or overwritten in place) is detected before it is read.

The data builder writes `checksums.json` (`{"algorithm": ..., "files": {name: digest}}`) last, when everything else
is in the folder; `verify_checksums` compares every listed file with its digest. The digest is the one the feature
store names its shards by (`features.store`): BLAKE2b of 16 bytes over the file's bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path


CHECKSUMS_FILE = "checksums.json"
ALGORITHM = "blake2b-128"


class CorruptFolder(Exception):
    """A file of a saved folder is missing or no longer has the content hash written when the folder was built."""


def content_digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """`content_digest` of a file's bytes, read in chunks."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def write_checksums(folder: str | os.PathLike) -> Path:
    """Write `folder/checksums.json` with the digest of every file directly in `folder` (atomically)."""
    folder = Path(folder)
    files = {path.name: file_digest(path) for path in sorted(folder.iterdir())
             if path.is_file() and path.name != CHECKSUMS_FILE}
    path = folder / CHECKSUMS_FILE
    tmp = folder / f".{CHECKSUMS_FILE}.{uuid.uuid4().hex}"
    tmp.write_text(json.dumps({"algorithm": ALGORITHM, "files": files}, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def verify_checksums(folder: str | os.PathLike) -> bool:
    """Check every file `folder/checksums.json` lists against its digest.

    Returns:
        True when they all match; False when the folder has no `checksums.json` (saved by other code, or by an
        earlier release): nothing can be checked.

    Raises:
        CorruptFolder: naming the first file that is missing or differs, or an unreadable `checksums.json`.
    """
    path = Path(folder) / CHECKSUMS_FILE
    if not path.is_file():
        return False
    try:
        listed = json.loads(path.read_text())
        if listed.get("algorithm") != ALGORITHM or not isinstance(listed.get("files"), dict):
            raise ValueError(f"not a {ALGORITHM} checksum list")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as error:
        raise CorruptFolder(f"{CHECKSUMS_FILE}: unreadable ({error})") from None
    for name, digest in listed["files"].items():
        file = Path(folder) / name
        if not file.is_file():
            raise CorruptFolder(f"{name}: missing")
        actual = file_digest(file)
        if actual != digest:
            raise CorruptFolder(f"{name}: its content hash {actual} is not the {digest} written when it was built "
                                "(changed or truncated since)")
    return True


__all__ = ["CHECKSUMS_FILE", "CorruptFolder", "content_digest", "file_digest", "write_checksums", "verify_checksums"]
