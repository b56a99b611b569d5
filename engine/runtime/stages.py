"""Named stages that run once per set of inputs: the one runner of the recipe (engine.recipe) and
of the toy world (engine.toyworld.loop), which declare their stages and hand them to `run_plan`.

    plan = [Stage("real", inputs={...}, fn=write_real, outputs=[folder]),
            Stage("finetune", inputs={...}, fn=lambda: finetune(cfg), outputs=[folder], after=["real"])]
    results = run_plan(plan, workdir, log, rerun_from=None, only=None)   # stage name -> its result

Each stage records a fingerprint of its inputs (its configs, and the fingerprints of the stages
whose outputs it reads) in WORKDIR/stages.json. A rerun skips a stage that finished with the same
inputs; a stage whose inputs changed starts over with its outputs cleared, and the stages after it
with it (their fingerprints hold its own). A stage that was interrupted (recorded as started, not
finished, same inputs) runs again with its outputs left in place, so it resumes through its own
resume: trainer checkpoints, finished shards.

Paths under the work folder are recorded relative to it (as $WORKDIR/...), in the fingerprints and
in the results, so a work folder that was moved or copied whole keeps its finished stages.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import fsspec

from engine.config import ConfigError, fingerprint
from engine.runtime.faults import maybe_fail_stage
from engine.runtime.storage import write_atomic

WORKDIR = "$WORKDIR"


def _rebase(obj: Any, old: str, new: str) -> Any:
    """`obj` with every string that is `old` or a path under it re-rooted at `new`."""
    if isinstance(obj, str):
        return new + obj[len(old):] if obj == old or obj.startswith(old + "/") else obj
    if isinstance(obj, dict):
        return {k: _rebase(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rebase(v, old, new) for v in obj]
    return obj


class Stages:
    """Runs each named stage once per set of inputs, recording results in `stages.json`. A stage's
    key is its config, not its code: after a code change, `rerun` names the stages to run again
    (the stages that read their outputs then rerun too). The other way round, `keep` names
    finished stages to count as done under changed settings, when the change cannot touch them
    (e.g. a new config key at a default that leaves them as they were). `only` names the one
    stage to run: every stage before it must have finished with the same inputs. `dry`: nothing
    runs and nothing is written; `would` says what a run would do with each stage."""

    def __init__(self, workdir: str, log: Callable[[str], None], rerun: Iterable[str] = (),
                 keep: Iterable[str] = (), only: Optional[str] = None, dry: bool = False):
        self.dry, self.would = dry, {}
        if not dry:
            os.makedirs(workdir, exist_ok=True)
        self.root = os.path.abspath(workdir)
        self.path = os.path.join(workdir, "stages.json")
        self.log = log
        self.record: dict[str, dict] = {}
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.record = json.load(f)
        self.rerun, self.keep, self.only = set(rerun), set(keep), only
        finished = self.finished()
        for verb, unknown in (("rerun", sorted(self.rerun - set(self.record))),
                              ("keep", sorted(self.keep - set(finished)))):
            if unknown:
                raise ConfigError(f"cannot {verb} {', '.join(unknown)}: {workdir} has no such finished stage "
                                  f"(finished: {', '.join(finished) or 'none yet'})")
        if self.rerun & self.keep:
            raise ConfigError(f"{', '.join(sorted(self.rerun & self.keep))}: both rerun and kept; choose one")

    def finished(self) -> list[str]:
        return [n for n, r in self.record.items() if "result" in r]

    def _save(self) -> None:
        if not self.dry:
            write_atomic(fsspec.filesystem("file"), self.path, json.dumps(self.record, indent=2).encode())

    def run(self, name: str, inputs: Any, fn: Callable[[], dict], outputs: list[str], after: list[str]) -> dict:
        """`inputs`: the stage's configs; `after`: the stages whose outputs it reads (their
        fingerprints join its own); `outputs`: the paths it writes, cleared when the stage
        restarts with other inputs."""
        # A stage that was run again (`rerun`) counts as new input for the stages after it.
        def key_of(field: str, relative: bool) -> str:
            data = json.loads(json.dumps({"inputs": inputs, "after": [
                self.record[a].get(field, self.record[a]["key"]) + "+" * self.record[a].get("reruns", 0)
                for a in after]}, default=str))
            return fingerprint(_rebase(data, self.root, WORKDIR) if relative else data)
        key = key_of("key", relative=True)
        seen = self.record.get(name, {})
        # A key recorded before paths were relative to the work folder, of absolute paths and of the
        # stages before it as they were recorded then, means the same inputs; kept for the stages after it.
        old = key_of("absolute_key", relative=False)
        if seen.get("key") == old != key:
            seen.update(key=key, absolute_key=old)
        reruns = seen.get("reruns", 0) + (name in self.rerun)
        if name in self.keep and seen.get("key") != key:
            seen["key"] = key
            self._save()
            self.log(f"{name}: kept under the new settings")
        done = seen.get("key") == key and "result" in seen and name not in self.rerun
        self.would[name] = "done earlier" if done else "runs"
        if self.only is not None and name != self.only:
            if not done:
                raise ConfigError(f"--only {self.only}: stage {name}, which comes before it, has not finished "
                                  f"with these settings; run without --only first (or --from {name})")
            return _rebase(seen["result"], WORKDIR, self.root)
        if done:
            self.log(f"{name}: done earlier ({seen['seconds']:.0f} s), skipped")
            return _rebase(seen["result"], WORKDIR, self.root)
        if self.dry:  # as if it had run: the stages reading it see its new key
            self.rerun.discard(name)
            self.record[name] = {"key": key, "reruns": reruns, "result": {}}
            return {}
        if seen.get("key") not in (None, key) or name in self.rerun:  # stale or half-finished output
            for p in outputs:
                shutil.rmtree(p, ignore_errors=True)
        self.rerun.discard(name)
        self.record[name] = {"key": key, "reruns": reruns}
        self._save()
        self.log(f"{name}: running")
        start = time.time()
        result = fn()
        maybe_fail_stage(name)  # the reliability tests' crash between a stage's work and its record
        self.record[name] = {"key": key, "reruns": reruns, "result": _rebase(result, self.root, WORKDIR),
                             "seconds": round(time.time() - start, 1)}
        self._save()
        self.log(f"{name}: done in {time.time() - start:.0f} s")
        return result


@dataclass
class Stage:
    """One declared stage: `fn` does its work and returns what is recorded; `inputs` are its
    configs, `outputs` the paths it writes, `after` the stages whose outputs it reads. `skipped`
    says why the config leaves it out (the plan shows it; --from and --only refuse it)."""
    name: str
    inputs: Any = None
    fn: Optional[Callable[[], dict]] = None
    outputs: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)
    skipped: str = ""


def _check_flags(plan: list[Stage], rerun_from: Optional[str], only: Optional[str]) -> None:
    if rerun_from and only:
        raise ConfigError("--from runs a stage and those after it, --only one stage; choose one")
    names = [s.name for s in plan]
    for flag, name in (("--from", rerun_from), ("--only", only)):
        if name is None:
            continue
        if name not in names:
            raise ConfigError(f"{flag} {name}: no such stage; the stages are {', '.join(names)}")
        skipped = plan[names.index(name)].skipped
        if skipped:
            raise ConfigError(f"{flag} {name}: the config skips it ({skipped})")


def run_plan(plan: list[Stage], workdir: str, log: Callable[[str], None], rerun_from: Optional[str] = None,
             only: Optional[str] = None, rerun: Iterable[str] = (), keep: Iterable[str] = (),
             dry: bool = False) -> dict[str, dict]:
    """Runs the plan's stages in order (see Stages); returns each stage's result by name.
    `rerun_from` runs that stage again and every finished stage after it; `only` runs one stage
    (those before it must have finished) and nothing after it; `rerun` and `keep` as in Stages.
    `dry`: runs nothing and writes nothing; returns what a run would do with each stage instead
    ("skipped: why", "done earlier" or "runs")."""
    _check_flags(plan, rerun_from, only)
    names = [s.name for s in plan]
    if len(set(names)) != len(names):
        raise ValueError(f"a plan names a stage twice: {sorted(n for n in set(names) if names.count(n) > 1)}")
    rerun = list(rerun)
    if rerun_from:
        finished = Stages(workdir, lambda m: None, dry=True).finished()
        rerun += [n for n in names[names.index(rerun_from):] if n in finished and n not in rerun]
    stages = Stages(workdir, (lambda m: None) if dry else log, rerun=rerun, keep=keep, only=only, dry=dry)
    skipped = {s.name for s in plan if s.skipped}
    results: dict[str, dict] = {}
    for s in plan:
        if s.skipped:
            continue
        # A skipped stage before it (a model the user already has) is no input of its own.
        results[s.name] = stages.run(s.name, s.inputs, s.fn, s.outputs, [a for a in s.after if a not in skipped])
        if s.name == only:
            break
    if dry:
        return {s.name: f"skipped: {s.skipped}" if s.skipped else stages.would.get(s.name, f"not run (--only {only})")
                for s in plan}
    return results
