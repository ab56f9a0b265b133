"""Digests of files: what fingerprints, manifests, model cards and the metadata pin compare."""
from __future__ import annotations

import hashlib
from pathlib import Path


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def files_digest(files: list[Path], root: Path | None) -> str:
    """sha256 of the one file, or of a `sha256sum`-style listing (paths from root) of several; '' for none."""
    digests = [(file_digest(f), f.relative_to(root).as_posix()) for f in sorted(files)]
    if len(digests) <= 1:
        return digests[0][0] if digests else ""
    listing = "".join(f"{d}  {name}\n" for d, name in digests)
    return hashlib.sha256(listing.encode()).hexdigest()
