"""Files that appear under their final name only once complete and checked."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def replaced_when_done(final: Path) -> Iterator[BinaryIO]:
    """A new file beside `final`, open for writing; when the block ends it is renamed
    to `final`, and when the block raises (a broken stream, a digest that does not
    match) it is deleted. A reader never sees a partial or unchecked file under the
    final name, and a good file already there survives a failed attempt."""
    fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
        tmp.replace(final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def file_sha256(path: Path) -> str:
    """`sha256:<hex>` of a file's bytes (the OCI digest form)."""
    with path.open("rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
