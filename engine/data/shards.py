"""Shards: WebDataset tars of generated samples, written atomically, with a manifest for resume.

Layout under the output path (local or any fsspec URL such as s3://bucket/run):

    run.json                      what produced this output (config fingerprint), to refuse mixing runs
    shards/shard-000000.tar       <key>.jpg, <key>.latent.npy, <key>.json [, <key>.features.npz]
    manifest/shard-000000.json    written only after its tar is whole: keys, dropped ids, counts, checksums
                                  (and the keys of images the quality filter refused, apart)

A shard is written under a temporary name and renamed when whole; its manifest entry comes after
the rename. A crash at any point leaves either no entry (the shard is redone on rerun, and a
leftover temporary is removed) or a whole shard. One manifest file per shard, rather than one
appended file, because object stores cannot append and several writers may finish at once.
"""
from __future__ import annotations

import hashlib
import io
import json
import mmap
import re
import tarfile
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Optional

import fsspec
import numpy as np

from engine.data.masks import status_counts
from engine.errors import UserError
from engine.runtime.faults import failing_fs
from engine.runtime.storage import is_local, url_of, write_atomic

KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
MEMBER_SUFFIXES = ("jpg", "latent.npy", "json", "features.npz")


class ShardError(UserError, RuntimeError):
    pass


def usable(record: dict) -> bool:
    """False for an image the quality filter refused (engine.generation.filter): it stays in its
    shard, for the record and the preview, and its manifest entry lists it under `refused_keys`,
    but no trainer, export or pool may use it."""
    return "refused_image" not in record


def filter_counts(records: list[dict]) -> dict:
    """The quality filter's verdicts on these sample records, per reason: a shard's manifest entry
    holds them."""
    images = Counter(r["refused_image"]["reason"] if not usable(r) else "kept" for r in records)
    boxes = Counter(b["reason"] for r in records for b in r.get("refused", []) if "clip" in b)
    boxes["kept"] = sum(len(r["clip_scores"]) for r in records)
    return {"images": {"kept": 0, **images}, "boxes": dict(boxes)}


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


@dataclass
class ShardEntry:
    index: int
    keys: list[str]
    dropped: list[int]
    boxes: int
    size: int  # bytes of the shard's tar
    sha256: str  # of the tar: resume checks the size, export the checksum
    records_sha256: str  # of its headers and JSON records: what an export without images checks
    extra: Optional[dict] = None  # more counts: masks by status, a pool's instances by category

    def as_dict(self) -> dict:
        """The manifest entry, as written to manifest/ and as `ShardStore.finished` returns it."""
        return {"index": self.index, "shard": shard_name(self.index), "keys": self.keys,
                "dropped": self.dropped, "samples": len(self.keys), "boxes": self.boxes,
                "size": self.size, "sha256": self.sha256, "records_sha256": self.records_sha256,
                **(self.extra or {})}


class ShardStore:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.damaged: dict[str, str] = {}  # shard -> why, filled by finished()
        self._created: list[str] = []  # folders prepare() made, removed again by discard_unclaimed
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as e:
            raise ShardError(f"cannot open the storage of {self.url!r}: {e} (s3:// and gs:// need "
                             f"`pip install -e .[cloud]`)") from None

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def shard_url(self, index: int) -> str:
        return url_of(self.fs, self._path("shards", shard_name(index)))

    # -- run identity ---------------------------------------------------------------------------
    def run_info(self) -> Optional[dict]:
        """What run.json says produced this output, or None for an output not started yet."""
        try:
            with self.fs.open(self._path("run.json"), "r") as f:
                info = json.load(f)
        except (FileNotFoundError, NotADirectoryError):  # under a file: no run.json can be there
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            info = None
        if not isinstance(info, dict) or "fingerprint" not in info:
            raise ShardError(f"{self.url}/run.json is damaged (not the JSON record of the config that wrote this "
                             f"output); restore it, or delete {self.url!r} to generate it afresh")
        return info

    def check_same_run(self, run_info: dict) -> None:
        """Refuse to resume into an output that another configuration wrote (reads only)."""
        old = self.run_info()
        if old is not None:
            if old.get("fingerprint") != run_info["fingerprint"]:
                raise ShardError(
                    f"output path {self.url!r} holds a different run (its prompts, model or image settings "
                    f"differ from this config's); resuming would mix two datasets. Use a new output.path, "
                    f"or delete the old output.")

    def prepare(self, run_info: dict) -> Optional[dict]:
        """Create the layout, check it is writable, and return the claim the shard writers must
        pass to `write_shard`: run_info for a new output, None for one this run already owns. The
        output is claimed (run.json) only with its first shard, so an attempt that fails before any
        work is done (a model that cannot load in the actors) leaves nothing that would refuse
        the corrected rerun."""
        self.check_same_run(run_info)
        fresh = self.run_info() is None
        if fresh and self.fs.isdir(self.root):
            foreign = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))
            # expansions/: prompt expansions an attempt cached before it wrote a shard.
            foreign = [name for name in foreign if name not in ("shards", "manifest", "expansions")]
            if foreign:
                raise ShardError(f"output path {self.url!r} is a folder that holds other files ({', '.join(foreign[:3])}"
                                 f"{', ...' if len(foreign) > 3 else ''}) and no InstaGen output; choose a new or "
                                 f"empty folder with output.path=...")
        self._created = [p for p in (self.root, self._path("shards"), self._path("manifest")) if not self.fs.exists(p)]
        try:
            self.fs.makedirs(self._path("shards"), exist_ok=True)
            self.fs.makedirs(self._path("manifest"), exist_ok=True)
            probe = self._path(f".write-probe-{uuid.uuid4().hex}")
            with self.fs.open(probe, "wb") as f:
                f.write(b"ok")
            self.fs.rm(probe)
        except (OSError, PermissionError) as e:
            raise ShardError(f"output path {self.url!r} is not writable ({e}); choose a path you can "
                             f"write to with output.path=...") from None
        return run_info if fresh else None

    def discard_unclaimed(self) -> None:
        """After a failed attempt that wrote no shard (so claimed nothing): remove the folders
        prepare() made."""
        if self.fs.exists(self._path("run.json")):
            return
        for path in reversed(self._created):
            try:
                if not self.fs.ls(path, detail=False):
                    self.fs.rmdir(path)
            except (FileNotFoundError, OSError):
                pass

    # -- manifest --------------------------------------------------------------------------------
    def finished(self) -> dict[int, dict]:
        """Manifest entries of shards whose tar is on storage at the size recorded. A damaged entry
        or shard (cut short, replaced, its entry not JSON) counts as not finished, so a rerun of
        generate redoes it; `damaged` says which and why."""
        entries, self.damaged = {}, {}
        for path in sorted(self.fs.glob(self._path("manifest", "shard-*.json"))):
            name = path.rsplit("/", 1)[-1].replace(".json", ".tar")
            try:
                with self.fs.open(path, "r") as f:
                    entry = json.load(f)
                index, shard = int(entry["index"]), entry["shard"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
                self.damaged[name] = "its manifest entry is not a JSON record"
                continue
            try:
                size = self.fs.size(self._path("shards", shard))
            except FileNotFoundError:
                self.damaged[shard] = "the shard is missing"
                continue
            if "size" in entry and size != entry["size"]:
                self.damaged[shard] = f"the shard holds {size} bytes, its manifest says {entry['size']}"
                continue
            entries[index] = entry
        return entries

    def read_shard(self, entry: dict, check: bool = True, records_only: bool = False) -> bytes | mmap.mmap:
        """The shard's bytes, checked (unless a caller already did) against its manifest entry's
        size and checksum; a damaged shard is a ShardError that says how to redo it. A local shard
        is mapped rather than read: hashing the page cache in place costs half of copying it out.

        `records_only`: the caller reads the JSON records and nothing else (an export without
        images), so only they and the tar's headers are checked, against `records_sha256`: a few
        pages a sample are read instead of all 178 KB of a 512 px one. Entries written before that
        checksum existed are checked whole."""
        path = self._path("shards", entry["shard"])
        records_only = records_only and "records_sha256" in entry
        if is_local(self.fs) and self.fs.size(path):
            with open(path, "rb") as f:
                data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            if records_only and hasattr(mmap, "MADV_RANDOM"):  # no read-ahead of the images and latents
                data.madvise(mmap.MADV_RANDOM)
        else:
            with self.fs.open(path, "rb") as f:
                data = f.read()
        if not check:
            return data
        if records_only:
            digest, expected = records_digest(data), entry["records_sha256"]
        else:
            digest, expected = hashlib.sha256(data).hexdigest(), entry.get("sha256")
        if len(data) != entry.get("size", len(data)) or digest != (expected or digest):
            raise ShardError(f"shard {entry['shard']} under {self.url!r} does not match its manifest (checksum "
                             f"differs): it was changed after it was written. Delete "
                             f"manifest/{entry['shard'].replace('.tar', '.json')} and rerun `instagen generate` "
                             f"with the same config to redo it")
        return data

    def remove_temporaries(self) -> int:
        stale = self.fs.glob(self._path("shards", ".*.tmp-*")) + self.fs.glob(self._path("manifest", ".*.tmp-*"))
        for path in stale:
            self.fs.rm(path)
        return len(stale)

    # -- writing ---------------------------------------------------------------------------------
    def write_shard(self, index: int, samples: list[dict], dropped: list[int],
                    claim: Optional[dict] = None, suffixes: tuple[str, ...] = MEMBER_SUFFIXES,
                    extra: Optional[dict] = None, generator: Optional[int] = None) -> ShardEntry:
        """samples: dicts with "__key__" and the member payloads (bytes) by suffix. Safe to call
        from many workers at once, each with its own shard: every file is written whole under its
        final name, the tar before its manifest entry. `claim` (from prepare) is written as
        run.json first unless a sibling writer already did: the same bytes either way. `suffixes`:
        the members a sample may have (an instance pool's differ); `extra`: counts the entry adds;
        `generator`: in a build with several, the index of the one that drew the shard."""
        data = pack_tar(samples, suffixes)
        fs = failing_fs(self.fs, index)
        if claim is not None and not fs.exists(self._path("run.json")):
            write_atomic(fs, self._path("run.json"), json.dumps(claim, indent=2).encode())
        write_atomic(fs, self._path("shards", shard_name(index)), data)
        records = [json.loads(s["json"]) for s in samples]
        # `keys` and `boxes` are what readers may use: an image the quality filter refused is
        # listed apart, in `refused_keys`.
        keys = [s["__key__"] for s, r in zip(samples, records) if usable(r)]
        boxes = sum(len(r.get("boxes", ())) for r in records if usable(r))
        if extra is None:
            extra = {}
            if any("mask_status" in r for r in records):
                extra["masks"] = status_counts(records)
            # Boxes refused, per reason: by layout verification (labeller layout+detector) or by
            # the quality filter.
            refused = Counter(r["reason"] for rec in records for r in rec.get("refused", []))
            if refused:
                extra["refused"] = dict(sorted(refused.items()))
            if any("clip_image" in r for r in records):
                extra["filter"] = filter_counts(records)
                extra["refused_keys"] = [s["__key__"] for s, r in zip(samples, records) if not usable(r)]
            # Prompt expansion (engine.generation.expansion): how each written sample's prompt came about.
            expansions = [r["expansion"] for r in records if "expansion" in r]
            if expansions:
                extra["expansion"] = {"expanded": sum(e["status"] == "expanded" for e in expansions),
                                      "retried": sum(e["tries"] > 1 for e in expansions),
                                      "fell_back": sum(e["status"] == "fell_back" for e in expansions)}
        if generator is not None:
            extra = {**extra, "generator": generator}
        entry = ShardEntry(index, keys, sorted(dropped), boxes, len(data), hashlib.sha256(data).hexdigest(),
                           records_digest(data, suffixes), extra or None)
        write_atomic(fs, self._path("manifest", f"shard-{index:06d}.json"), json.dumps(entry.as_dict()).encode())
        return entry


class ShardWriter:
    """A Ray Data actor: writes finished shard rows of the generate pipeline (parallel lists: id,
    status, jpg, latent, json [, features]) into their tars and manifest entries, on the node
    where they were made, and returns only the entry, which is all the driver keeps.

    An actor rather than a task: Ray kills idle task workers within a second once a node runs
    more processes than CPUs (the model actors count), so a writer task per shard started a new
    Python process per shard, which took more CPU than the write (bench/generate.py). It lives
    here, beside the format it writes, so that its process imports no model library."""

    def __init__(self, url: str, claim: Optional[dict]):
        self.store, self.url, self.claim = ShardStore(url), url, claim

    def __call__(self, row: dict) -> dict:
        samples, dropped = [], []
        for j, status in enumerate(row["status"]):
            pid = int(row["id"][j])
            if status != "ok":
                dropped.append(pid)
                continue
            sample = {"__key__": f"{pid:09d}", "jpg": row["jpg"][j], "latent.npy": row["latent"][j],
                      "json": row["json"][j]}
            if "features" in row:
                sample["features.npz"] = row["features"][j]
            samples.append(sample)
        index = int(row["shard"])
        try:
            entry = self.store.write_shard(index, samples, dropped, self.claim,
                                           generator=int(row["generator"]) if "generator" in row else None)
        except OSError as e:
            # Returned, not raised: the other shards in flight are still written, and a run that
            # fails inside Ray Data keeps its actors (and their CPUs) for as long as the error
            # lives in the calling process. The driver raises it once the pipeline has drained.
            return {"entry": "", "error": f"writing shard {index} under {self.url!r} failed ({e}); nothing of "
                                          f"it was kept: free the space or fix the permissions, then rerun the "
                                          f"same command"}
        return {"entry": json.dumps(entry.as_dict()), "error": ""}


def pack_tar(samples: list[dict], suffixes: tuple[str, ...] = MEMBER_SUFFIXES) -> bytes:
    """A tar in memory, members sorted by key then suffix, with fixed metadata so that the same
    samples always give the same bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"]
            if not KEY_RE.match(key):
                raise ShardError(f"sample key {key!r} is not a plain name")
            for suffix in suffixes:
                payload = sample.get(suffix)
                if payload is None:
                    continue
                if isinstance(payload, str):
                    payload = payload.encode()
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mode, info.mtime = len(payload), 0o644, 0
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


# -- reading -------------------------------------------------------------------------------------

def decode_sample(sample: dict) -> dict:
    """Decode a raw webdataset sample: JPEG to PIL, .npy without pickle, JSON. Anything else in a
    shard is refused rather than decoded: a shard must never be able to run code (no pickle)."""
    from PIL import Image
    key = sample["__key__"]
    if not KEY_RE.match(key.rsplit("/", 1)[-1]) or ".." in key or key.startswith("/"):
        raise ShardError(f"shard member {key!r} has a name that is not a plain sample key; "
                         f"the shard is corrupt or hostile, regenerate it")
    out = {"__key__": key.rsplit("/", 1)[-1], "__url__": sample.get("__url__")}
    for name, payload in sample.items():
        if name.startswith("__"):
            continue
        if name == "jpg":
            out["jpg"] = Image.open(io.BytesIO(payload)).convert("RGB")
        elif name == "png":  # an instance pool's RGBA cut-out (engine.generation.pool)
            out["png"] = Image.open(io.BytesIO(payload)).convert("RGBA")
        elif name in ("latent.npy",):
            out["latent"] = np.load(io.BytesIO(payload), allow_pickle=False)
        elif name == "features.npz":
            with np.load(io.BytesIO(payload), allow_pickle=False) as z:
                out["features"] = [z[f"level{i}"] for i in range(len(z.files))]
        elif name == "json":
            out["json"] = json.loads(payload)
        else:
            raise ShardError(f"shard member {key}.{name} has an unexpected type; "
                             f"only {', '.join(MEMBER_SUFFIXES)} and png are read")
    return out


def samples_in_tar(data: bytes, suffixes: tuple[str, ...] = MEMBER_SUFFIXES) -> Iterator[dict]:
    """The raw samples of a shard held in memory, in order: {"__key__", suffix: payload, ...}, each
    payload a zero-copy view into `data` (so a mapped shard's pages are read only when a payload
    is used)."""
    sample = {}
    for key, suffix, _, payload in tar_members(data, suffixes):
        if sample and sample["__key__"] != key:
            yield sample
            sample = {}
        sample["__key__"] = key
        sample[suffix] = payload
    if sample:
        yield sample


def tar_members(data: bytes, suffixes: tuple[str, ...] = MEMBER_SUFFIXES) -> Iterator[tuple]:
    """(key, suffix, header, payload) of each member, the last two zero-copy views into `data`.
    Reads the plain USTAR layout pack_tar writes (a 512-byte header, the payload padded to 512)
    rather than going through tarfile, which copies every member and costs more than the checksum;
    anything else in a shard is refused, as are member names that are not plain sample files."""
    view, offset = memoryview(data), 0
    while offset + 512 <= len(data) and any(view[offset:offset + 512]):
        header = bytes(view[offset:offset + 512])
        name = header[:100].rstrip(b"\0").decode("utf-8", "replace")
        key, _, suffix = name.partition(".")
        try:
            size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
        except ValueError:
            size = -1
        if (header[156:157] not in (b"0", b"\0") or header[345:500].strip(b"\0") or size < 0
                or not KEY_RE.match(key) or suffix not in suffixes or offset + 512 + size > len(data)):
            raise ShardError(f"shard member {name!r} is not a sample file ({', '.join(suffixes)} of a plain "
                             f"key); the shard is corrupt or hostile, regenerate it")
        yield key, suffix, view[offset:offset + 512], view[offset + 512:offset + 512 + size]
        offset += 512 + (size + 511) // 512 * 512


def records_digest(data: bytes, suffixes: tuple[str, ...] = MEMBER_SUFFIXES) -> str:
    """SHA-256 of a shard's member headers and JSON payloads, in order: the headers fix every
    member's name, size and so place, the payloads are the records. What an export without images
    reads is then checked as surely as by the whole tar's checksum."""
    digest = hashlib.sha256()
    for _, suffix, header, payload in tar_members(data, suffixes):
        digest.update(header)
        if suffix == "json":
            digest.update(payload)
    return digest.hexdigest()


def _open_with_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    return fsspec.open(url, mode).open()


def iter_samples(urls: list[str], decode: bool = True) -> Iterator[dict]:
    """Read samples in order through the webdataset library."""
    import importlib

    import webdataset as wds
    gopen = importlib.import_module("webdataset.gopen")  # the module; `webdataset.gopen` is a function
    # webdataset opens only local files, pipes and a few URL kinds itself; object stores
    # (s3://, gs://, memory://, ...) are read through fsspec like everything else here.
    for url in urls:
        scheme = url.split("://", 1)[0] if "://" in url else None
        if scheme and scheme != "file":
            gopen.gopen_schemes[scheme] = _open_with_fsspec
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    for sample in dataset:
        yield decode_sample(sample) if decode else sample


def shard_urls(url: str, indices: Optional[list[int]] = None) -> list[str]:
    """The finished shards of the output at `url` (checked by finished_shards), in order."""
    store, entries = finished_shards(url)
    return [store.shard_url(i) for i in sorted(entries) if indices is None or i in indices]


def finished_shards(url: str, key: str = "") -> tuple[ShardStore, dict[int, dict]]:
    """The store and finished manifest entries of a generation output that a command reads,
    checked before Ray starts: an output `instagen generate` wrote (its run.json), with at least
    one finished shard and no damaged one (the sizes its manifest records; a trainer that skipped
    it would quietly train on less). `key` is the setting that names `url`, for the message."""
    where = f"{key} {url!r}" if key else repr(url)
    store = ShardStore(url)
    if store.run_info() is None:
        raise ShardError(f"{where} holds no output of `instagen generate` (no run.json); run it with "
                         f"output.path={url} first, or point {key or 'the command'} at the output.path of one")
    entries = store.finished()
    if store.damaged:
        shard, why = sorted(store.damaged.items())[0]
        raise ShardError(f"{where}: {len(store.damaged)} shard(s) damaged ({shard}: {why}); rerun "
                         f"`instagen generate` with the config that wrote it to redo them")
    if not entries:
        raise ShardError(f"{where} holds no finished shards; rerun `instagen generate` with output.path={url}")
    return store, entries
