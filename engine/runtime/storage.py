"""Writing outputs whole, the one place that does it: a reader sees the old file or folder or the
whole new one, never half of one, and a failed write leaves no temporary behind."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import fsspec

from engine.errors import UserError


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


def replace_folder(fs: fsspec.AbstractFileSystem, new: str, path: str) -> None:
    """Move the finished folder `new` to `path`, replacing what was there: locally a rename, so
    readers see the old folder or the new one; on object stores, which have no folders to
    rename, a copy of each object."""
    fs.invalidate_cache()  # other processes wrote `new`: a listing cached here may predate them
    old = f"{path.rstrip('/')}.old-{uuid.uuid4().hex}" if fs.exists(path) else None
    if old:
        _move_tree(fs, path, old)
    _move_tree(fs, new, path)
    if old:
        fs.rm(old, recursive=True)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return bool({"file", "local"} & set([fs.protocol] if isinstance(fs.protocol, str) else fs.protocol))


def _move_tree(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    if is_local(fs):
        fs.mv(src, dst)
        return
    files = fs.find(src)
    fs.copy(files, [dst + f[len(src):] for f in files])
    fs.rm(files)


def url_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URL another process opens `path` of `fs` by: the path itself on the local disk."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if is_local(fs) else f"{protocol}://{path}"


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


def read_bytes(path: str) -> bytes:
    """The whole file at a local path or any fsspec URL (s3://, gs://, ...)."""
    with fsspec.open(os.fspath(path), "rb") as f:
        return f.read()


def file_version(path: str) -> Optional[tuple]:
    """What changes when the file at `path` changes: (size, modification time, inode) locally, (size,
    mtime / LastModified / ETag) where an object store gives one; None when nothing is there or
    the store tells no version (then nothing may be remembered about the file)."""
    try:
        fs, target = fsspec.core.url_to_fs(os.fspath(path))
        if is_local(fs):  # the inode too: a file replaced by a rename within one clock tick is another file
            st = os.stat(target)
            return (st.st_size, st.st_mtime_ns, st.st_ino) if os.path.isfile(target) else None
        info = fs.info(target)
    except (OSError, ValueError, ImportError):
        return None
    if info.get("type") != "file":
        return None
    stamp = next((info[k] for k in ("mtime", "LastModified", "ETag", "updated", "etag") if info.get(k)), None)
    return None if stamp is None else (info.get("size"), str(stamp))


# read_json's memo while a `parse_once()` block runs: {(path, file_version): parsed document}.
_parsed: Optional[dict] = None


@contextmanager
def parse_once() -> Iterator[None]:
    """Within the block, read_json parses each file once: a caller that checks a dataset, then
    plans its categories, then checks it again, reads a 1 GB LVIS file once instead of three
    times. The documents are shared between callers, so the code inside must not change them;
    a file whose size or modification time changed is parsed again, and everything is dropped
    when the outermost block ends (a long run must not keep gigabytes of JSON alive)."""
    global _parsed
    outer = _parsed is not None
    if not outer:
        _parsed = {}
    try:
        yield
    finally:
        if not outer:
            _parsed = None


def read_json(path: str, what: str, error: type[UserError], hint: str = "") -> Any:
    """The JSON document at `path`; a missing or malformed file raises `error` naming `what` it
    should have been and, after a semicolon, `hint`: how to fix it. JSON is parsed as data only.
    Inside `parse_once()` a file already parsed (same size and modification time) is not read again."""
    key = (os.fspath(path), file_version(path)) if _parsed is not None else None
    if key is not None and key[1] is not None and key in _parsed:
        return _parsed[key]
    hint = f"; {hint}" if hint else ""
    try:
        raw = read_bytes(path)
    except FileNotFoundError:
        raise error(f"{what} {os.fspath(path)!r} does not exist{hint}") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{what} {os.fspath(path)!r} is not valid JSON ({e}); was it cut off while being "
                    f"written or downloaded?") from None
    if key is not None and key[1] is not None and _parsed is not None:
        _parsed[key] = data
    return data
