"""Generation survives crashes, failing writes, NaNs and hostile shards with nothing lost or duplicated."""
import io
import json
import os
import tarfile
import time

import pytest
import ray
from conftest import ray_with_env
from PIL import Image

from engine.config import load_config
from engine.generation.pipeline import generate
from engine.generation.prompts import make_prompts
from engine.data.shards import ShardError, ShardStore, decode_sample, iter_samples, samples_in_tar, shard_urls

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["prompts.images_per_category=2", "synthesis.steps=2", "synthesis.batch_size=2",
         "output.shard_size=3", "annotation.batch_size=2"]
POISONED = (1, 5)  # prompt ids that come out of the model as NaN on their first attempt


@pytest.fixture(scope="module")
def faulty_ray(tmp_path_factory):
    """A local Ray whose workers carry the fault-injection switches (engine/runtime/faults.py)."""
    marker_dir = str(tmp_path_factory.mktemp("faults"))
    with ray_with_env({"INSTAGEN_FAULT_CRASH": "synthesis:2", "INSTAGEN_FAULT_DIR": marker_dir,
                       "INSTAGEN_FAULT_NAN": ",".join(map(str, POISONED))}):
        yield marker_dir


def config(out, *extra):
    return load_config(os.path.join(ROOT, "configs/tiny.yaml"), SMALL + [f"output.path={out}", *extra])


def all_cpus_free(wait_s: float = 30.0) -> bool:
    deadline = time.time() + wait_s
    while time.time() < deadline:
        if ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]:
            return True
        time.sleep(0.5)
    return False


def keys_in(out):
    keys = [s["__key__"] for s in iter_samples(shard_urls(out), decode=False)]
    assert len(keys) == len(set(keys)), "duplicate keys"
    return set(keys)


def test_actor_crash_is_redone_and_nan_regenerated(faulty_ray, tmp_path):
    out = str(tmp_path / "run")
    cfg = config(out)
    summary = generate(cfg)
    # The synthesis actor died on its 2nd batch (hard exit); Ray restarted it and redid the batch.
    assert os.path.exists(os.path.join(faulty_ray, "instagen-crashed-synthesis"))
    assert summary.images == 8 and summary.dropped == 0
    assert keys_in(out) == {f"{r.id:09d}" for r in make_prompts(cfg.prompts)}
    for sample in iter_samples(shard_urls(out)):
        meta = sample["json"]
        if meta["id"] in POISONED:  # regenerated from a derived seed, recorded in the sample
            assert meta["seed_used"] != meta["seed"]
        else:
            assert meta["seed_used"] == meta["seed"]


def test_nan_samples_dropped_and_counted(faulty_ray, tmp_path):
    out = str(tmp_path / "run")
    cfg = config(out, "synthesis.on_nonfinite=drop")
    summary = generate(cfg)
    assert summary.dropped == len(POISONED) and summary.images == 8 - len(POISONED)
    expected = {f"{r.id:09d}" for r in make_prompts(cfg.prompts) if r.id not in POISONED}
    assert keys_in(out) == expected
    dropped = sorted(i for e in ShardStore(out).finished().values() for i in e["dropped"])
    assert dropped == sorted(POISONED)
    assert generate(cfg).shards_written == 0, "a dropped sample is a decision, not missing work"


def test_failing_shard_write_leaves_nothing_and_rerun_writes_it(faulty_ray, tmp_path):
    out = str(tmp_path / "run")
    cfg = config(out)
    open(os.path.join(faulty_ray, "fail-write-1"), "w").close()  # armed: shard 1's worker finds the disk full
    with pytest.raises(ShardError, match="writing shard 1 .* failed .*No space left on device.* rerun"):
        generate(cfg)
    assert not os.path.exists(os.path.join(faulty_ray, "fail-write-1")), "the write on the worker was not tried"
    # The failed run's actors are gone: a rerun in the same process needs their CPUs (it waited
    # for them forever when the write error failed the Ray Data run: its actors lived on with it).
    assert all_cpus_free(), f"a failed generate left actors holding CPUs: {ray.available_resources()}"
    # The other shards were written (a write error does not throw away work in flight); had none
    # been, nothing would have claimed the output and its empty folders would be gone again.
    shards = os.listdir(os.path.join(out, "shards")) if os.path.isdir(os.path.join(out, "shards")) else []
    assert "shard-000001.tar" not in shards and not [f for f in shards if ".tmp-" in f]
    assert 1 not in ShardStore(out).finished()
    summary = generate(cfg)
    assert summary.shards == 3 and 1 in ShardStore(out).finished()
    assert len(keys_in(out)) == 8


def tar_with(name: str, payload: bytes = b"{}") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


@pytest.mark.parametrize("member", ["../../etc/evil.json", "/abs/path.json", "a/../../b.json"])
def test_tar_member_escaping_the_folder_is_refused(tmp_path, member):
    path = tmp_path / "hostile.tar"
    path.write_bytes(tar_with(member))
    with pytest.raises(ShardError, match="not a plain sample key"):
        list(iter_samples([str(path)]))


@pytest.mark.parametrize("member", ["../../etc/evil.json", "/abs/path.json", "000000001.pyd", "000000001"])
def test_export_reader_refuses_members_that_are_not_sample_files(member):
    """samples_in_tar, export's zero-copy reader, checks what webdataset's path checks."""
    with pytest.raises(ShardError, match="not a sample file"):
        list(samples_in_tar(tar_with(member)))
    sample, = samples_in_tar(tar_with("000000001.json", b'{"a": 1}'))
    assert sample["__key__"] == "000000001" and bytes(sample["json"]) == b'{"a": 1}'


def test_pickled_member_is_never_unpickled(tmp_path):
    path = tmp_path / "pickle.tar"
    path.write_bytes(tar_with("000000001.pyd", b"\x80\x04K\x01."))
    with pytest.raises(ShardError, match="unexpected type"):
        list(iter_samples([str(path)]))
    # An .npy holding Python objects needs pickle to load: refused too.
    import numpy as np
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        decode_sample({"__key__": "000000001", "latent.npy": buf.getvalue()})


def test_truncated_shard_is_an_error_not_a_partial_read(tmp_path):
    whole = tar_with("000000001.json", json.dumps({"a": 1}).encode() * 200)
    path = tmp_path / "cut.tar"
    path.write_bytes(whole[: len(whole) // 3])
    with pytest.raises(Exception):
        list(iter_samples([str(path)]))


def test_model_folders_are_replaced_whole_or_not_at_all(tmp_path):
    from engine.runtime.storage import atomic_folder
    target = tmp_path / "model"
    with atomic_folder(str(target)) as tmp:
        open(os.path.join(tmp, "weights"), "w").write("v1")
    with pytest.raises(RuntimeError):
        with atomic_folder(str(target)) as tmp:
            open(os.path.join(tmp, "weights"), "w").write("half of v2")
            raise RuntimeError("killed mid-save")
    assert open(target / "weights").read() == "v1"
    assert sorted(os.listdir(tmp_path)) == ["model"], "no temporary left behind"
    with atomic_folder(str(target)) as tmp:
        open(os.path.join(tmp, "weights"), "w").write("v2")
    assert open(target / "weights").read() == "v2" and sorted(os.listdir(tmp_path)) == ["model"]


def test_non_utf8_file_names_and_annotation_bytes(tmp_path):
    """A file name that is not UTF-8 loads like any other; an annotation file that is not UTF-8
    is one clear error naming it."""
    from engine.data.datasets import DatasetError, load_detection_dataset
    from fixtures_coco import make_coco_dataset
    ann, root = make_coco_dataset(tmp_path / "data", n_images=3, categories=["red square", "blue disc"])
    coco = json.load(open(ann))
    odd = b"caf\xe9-\xff.jpg"  # Latin-1 bytes: not valid UTF-8
    first = coco["images"][0]
    os.rename(os.path.join(root, first["file_name"]), os.path.join(os.fsencode(root), odd))
    first["file_name"] = os.fsdecode(odd)  # how Python spells such a name (surrogate escapes)
    json.dump(coco, open(ann, "w"))
    dataset = load_detection_dataset(ann, root)
    assert len(dataset.records) == 3 and sum(dataset.skipped.counts.values()) == 0
    bad = tmp_path / "latin1.json"
    bad.write_bytes(b'{"images": [], "annotations": [], "categories": [{"id": 1, "name": "caf\xe9"}]}')
    with pytest.raises(DatasetError, match="latin1.json"):
        load_detection_dataset(str(bad), root)


def small_output(path, shards: int = 3) -> ShardStore:
    """An output of `shards` whole shards of two samples each, written as generate writes them."""
    store = ShardStore(str(path))
    claim = store.prepare({"fingerprint": "test", "categories": ["cat"], "novel": []})
    for i in range(shards):
        samples = []
        for k in range(2):
            key = f"{2 * i + k:09d}"
            img = io.BytesIO()
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(img, format="JPEG")
            record = {"id": 2 * i + k, "prompt": "a cat", "seed_used": 0, "width": 8, "height": 8,
                      "boxes": [[1, 1, 5, 5]], "labels": ["cat"], "scores": [0.9], "labellers": ["detector"]}
            samples.append({"__key__": key, "jpg": img.getvalue(), "json": json.dumps(record)})
        store.write_shard(i, samples, [], claim)
    return store


def test_damaged_shards_and_entries_are_redone_and_refused_by_export(local_ray, tmp_path):
    from engine.generation.export import export
    out = tmp_path / "run"
    store = small_output(out)
    assert sorted(store.finished()) == [0, 1, 2] and not store.damaged
    whole = export(str(out), dest=str(tmp_path / "whole"))  # whole shards pass their checksums
    assert (whole["images"], whole["annotations"]) == (6, 6)
    tar1 = out / "shards" / "shard-000001.tar"
    tar1.write_bytes(tar1.read_bytes()[:-700])  # cut short
    (out / "manifest" / "shard-000002.json").write_text("{not json")
    assert sorted(store.finished()) == [0]  # a rerun of generate redoes shards 1 and 2
    assert set(store.damaged) == {"shard-000001.tar", "shard-000002.tar"}
    with pytest.raises(ShardError, match="2 shard\\(s\\) damaged .* rerun `instagen generate`"):
        export(str(out))
    assert not (out / "images").exists() and not (out / "coco.json").exists()


def test_a_replaced_shard_of_the_same_size_fails_its_checksum(local_ray, tmp_path):
    from engine.generation.export import export
    out = tmp_path / "run"
    small_output(out)
    tar0 = out / "shards" / "shard-000000.tar"
    data = bytearray(tar0.read_bytes())
    data[600] ^= 0xFF  # one byte inside the first JPEG: same size, other content
    tar0.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard-000000.tar .* does not match its manifest"):
        export(str(out))
    assert sorted(os.listdir(out)) == ["manifest", "run.json", "shards"], "an export is of whole shards or none"
    tar0.unlink()
    (out / "manifest" / "shard-000000.json").unlink()
    assert sorted(ShardStore(str(out)).finished()) == [1, 2]


def test_an_export_without_images_checks_the_records_it_reads(local_ray, tmp_path):
    """Without images, export reads and checks only the tar's headers and JSON records (a few
    pages of a 178 KB sample): a changed record is refused, a changed JPEG is not read at all."""
    from engine.generation.export import export
    out = tmp_path / "run"
    small_output(out)
    tar0, tar1 = out / "shards" / "shard-000000.tar", out / "shards" / "shard-000001.tar"
    original = tar1.read_bytes()
    data = bytearray(original)
    data[600] ^= 0xFF  # inside the first JPEG
    tar1.write_bytes(bytes(data))
    assert export(str(out), dest=str(tmp_path / "labels"), write_images=False)["images"] == 6
    with pytest.raises(ShardError, match="shard-000001.tar .* does not match its manifest"):
        export(str(out), dest=str(tmp_path / "full"))
    tar1.write_bytes(original)
    tar0.write_bytes(tar0.read_bytes().replace(b'"a cat"', b'"a bat"', 1))  # a record, same size
    with pytest.raises(ShardError, match="shard-000000.tar .* does not match its manifest"):
        export(str(out), dest=str(tmp_path / "changed"), write_images=False)
    assert not (tmp_path / "changed").exists() or not os.listdir(tmp_path / "changed")
    # An entry written before records were checked on their own: the whole shard is checked.
    manifest = out / "manifest" / "shard-000001.json"
    manifest.write_text(json.dumps({k: v for k, v in json.loads(manifest.read_text()).items()
                                    if k != "records_sha256"}))
    tar0.write_bytes(tar0.read_bytes().replace(b'"a bat"', b'"a cat"', 1))
    tar1.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard-000001.tar .* does not match its manifest"):
        export(str(out), dest=str(tmp_path / "old"), write_images=False)


def test_damaged_run_json_is_one_clear_error(tmp_path):
    out = tmp_path / "run"
    small_output(out, shards=1)
    (out / "run.json").write_text("\x00\x01garbage")
    with pytest.raises(ShardError, match="run.json is damaged"):
        ShardStore(str(out)).run_info()
