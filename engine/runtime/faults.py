"""Fault injection for the reliability tests: switched on only by environment variables.

INSTAGEN_FAULT_CRASH=<stage>:<k>   the process of that stage's actor exits on its k-th batch,
                                   once per marker file (INSTAGEN_FAULT_DIR), so a restarted
                                   actor does not crash again.
INSTAGEN_FAULT_NAN=<id>,<id>...    those prompt ids come out of the model as NaN on their first
                                   attempt (a regeneration with a derived seed is clean).
<INSTAGEN_FAULT_DIR>/fail-write-<k>  a file armed by a test: the next write of shard k stops half
                                   way with "No space left on device" (once; the file is removed).
INSTAGEN_FAULT_STAGE=<stage>       a staged run (engine.runtime.stages) fails once after that
                                   stage's work, before it is recorded as finished.
"""
from __future__ import annotations

import errno
import os


def maybe_crash(stage: str, batch_number: int) -> None:
    spec = os.environ.get("INSTAGEN_FAULT_CRASH")
    if not spec:
        return
    want_stage, _, k = spec.partition(":")
    if want_stage != stage or int(k) != batch_number:
        return
    marker = os.path.join(os.environ.get("INSTAGEN_FAULT_DIR", "/tmp"), f"instagen-crashed-{stage}")
    if os.path.exists(marker):
        return
    open(marker, "w").close()
    os._exit(1)  # a hard crash, as a killed or OOM worker would die


def poison_nonfinite(ids: list[int], drawn, attempt: int) -> None:
    spec = os.environ.get("INSTAGEN_FAULT_NAN")
    if not spec or attempt > 0:
        return
    bad = {int(x) for x in spec.split(",") if x}
    for j, i in enumerate(ids):
        if i in bad:
            drawn.latents[j] = float("nan")
            drawn.finite[j] = False


def failing_fs(fs, shard: int):
    """`fs`, or, when a test armed it for this shard, a stand-in whose next file written lands
    half its bytes and then fails as a full disk would."""
    marker = os.path.join(os.environ.get("INSTAGEN_FAULT_DIR", "/tmp"), f"fail-write-{shard}")
    if not os.environ.get("INSTAGEN_FAULT_DIR") or not os.path.exists(marker):
        return fs
    os.remove(marker)

    class DiskFull:
        def __getattr__(self, name):
            return getattr(fs, name)

        def open(self, path, mode="rb", **kw):
            handle = fs.open(path, mode, **kw)
            if "w" in mode:
                handle.write(b"half a file")
                handle.close()
                raise OSError(errno.ENOSPC, "No space left on device")
            return handle
    return DiskFull()


class InjectedStageFailure(RuntimeError):
    pass


def maybe_fail_stage(stage: str) -> None:
    """INSTAGEN_FAULT_STAGE=<stage>: the driver fails once (per marker file in INSTAGEN_FAULT_DIR)
    after that stage's work is done and before it is recorded as finished, the worst moment for a
    crash: a rerun must resume the stage through its own outputs without redoing the ones before."""
    if os.environ.get("INSTAGEN_FAULT_STAGE") != stage:
        return
    marker = os.path.join(os.environ.get("INSTAGEN_FAULT_DIR", "/tmp"), f"instagen-failed-stage-{stage}")
    if os.path.exists(marker):
        return
    open(marker, "w").close()
    raise InjectedStageFailure(f"injected failure after stage {stage} (INSTAGEN_FAULT_STAGE)")
