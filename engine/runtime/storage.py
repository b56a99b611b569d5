"""Writing outputs whole, the one place that does it: a reader sees the old file or folder or the
whole new one, never half of one, and a failed write leaves no temporary behind."""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from typing import Iterator

import fsspec


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` under a temporary sibling name, then rename it to `path`: on any filesystem
    fsspec reaches (local, s3, gs, ...) a reader sees the whole file or none, and a failed write
    leaves no temporary behind."""
    folder, name = path.rsplit("/", 1) if "/" in path else (".", path)
    tmp = f"{folder}/.{name}.tmp-{uuid.uuid4().hex}"
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def write_file(path: str, data: bytes) -> None:
    """write_atomic to a local path or any fsspec URL, making its folder first."""
    fs, target = fsspec.core.url_to_fs(os.fspath(path))
    folder = target.rsplit("/", 1)[0] if "/" in target else ""
    if folder:
        fs.makedirs(folder, exist_ok=True)
    write_atomic(fs, target, data)


@contextmanager
def atomic_folder(folder: str) -> Iterator[str]:
    """Yield a temporary sibling of `folder` to write into. On success it replaces `folder` whole
    (an old one is moved aside first, then deleted); on failure it is removed and `folder` is as
    it was. Used for every model folder a later stage loads."""
    folder = os.path.abspath(os.path.expanduser(folder))
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.exists(folder):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.old-", dir=parent)
            os.replace(folder, os.path.join(old, "previous"))
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
