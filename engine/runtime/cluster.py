"""Ray: connect to the running cluster when there is one, start an embedded local Ray when there is
none, and size actor pools from what the cluster actually offers."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import NoReturn, Optional

from engine.config import RayConfig
from engine.errors import UserError


class ResourceError(UserError, RuntimeError):
    pass


def connect(cfg: RayConfig) -> None:
    import ray
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    # Ray 2.60 turns token auth on by default; an embedded single-user cluster does not need it.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, logging_level=logging.WARNING,
                 configure_logging=True,
                 runtime_env={"worker_process_setup_hook": "engine.runtime.cluster.quiet_without_dashboard"})


def quiet_data_context():
    """Ray Data settings for the engine's jobs: progress lines of our own rather than Ray's bars
    (they garble job logs), and a failing task's own exception rather than Ray Data's wrapper,
    which loses the cause when it crosses processes, so a UserError raised on a worker reaches
    the driver's one-line report."""
    import ray
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.raise_original_map_exception = True
    return ctx


# Ray Train's placement-group cleaner asks the State API, which the dashboard serves, every second
# whether the train controller still lives, and warns each time it cannot ask. An embedded Ray has
# no dashboard (it costs a process and start-up time on a laptop) and dies with the driver, placement
# groups and all, so there is nothing for the cleaner to clean: its warnings are noise there.
PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_without_dashboard() -> None:
    """worker_process_setup_hook of the embedded Ray: runs in each of its worker processes."""
    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)


@dataclass
class PoolPlan:
    size: int
    num_cpus: float
    num_gpus: float

    def remote_args(self) -> dict:
        # Ray Data already restarts a crashed actor and retries its unfinished batches
        # (max_restarts=-1, max_task_retries=-1 by default); the reliability tests pin that.
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}


def plan_pools(resources: dict, nodes: list[dict], synth_actors: int, synth_gpus: float,
               annot_actors: int, annot_gpus: float, allow_autoscale: bool = False) -> tuple[PoolPlan, PoolPlan]:
    """Decide pool sizes and per-actor resources for synthesis and annotation.

    On GPUs each synthesis actor holds `synth_gpus` GPUs and annotation actors share GPUs. On a
    CPU-only cluster the CPUs are split: Ray actors that together ask for more CPUs than exist
    wait forever without an error, so we never ask for more than there is, and keep half a CPU
    free for Ray Data's own read and transfer tasks.
    """
    total_cpus = float(resources.get("CPU", 0))
    total_gpus = float(resources.get("GPU", 0))
    node_gpus = max([float(n.get("Resources", {}).get("GPU", 0)) for n in nodes if n.get("Alive", True)] or [0])
    if total_cpus < 1:
        raise ResourceError(f"the Ray cluster offers {total_cpus:g} CPUs; at least 1 is needed")
    if total_gpus > 0 or allow_autoscale:
        for what, g in (("synthesis.gpus_per_actor", synth_gpus), ("annotation.gpus_per_actor", annot_gpus)):
            if g <= 0:
                raise ResourceError(f"{what} must be > 0 on a GPU cluster")
            if g > node_gpus and not allow_autoscale:
                raise ResourceError(
                    f"{what}={g:g} but the largest node has {node_gpus:g} GPUs; no actor could ever start. "
                    f"Lower {what}, or set ray.allow_autoscale=true if the autoscaler adds bigger nodes.")
        n_synth = synth_actors or max(1, int(total_gpus // synth_gpus))
        n_annot = annot_actors or max(1, n_synth // 2)
        return (PoolPlan(n_synth, 1.0, synth_gpus), PoolPlan(n_annot, 1.0, annot_gpus))
    budget = total_cpus - 0.5
    n_annot = annot_actors or 1
    annot_cpus = 0.5
    synth_budget = budget - n_annot * annot_cpus
    if synth_budget < 0.5:
        raise ResourceError(f"the cluster's {total_cpus:g} CPUs cannot hold {n_annot} annotation actors "
                            f"and a synthesis actor; lower annotation.num_actors")
    n_synth = synth_actors or max(1, int(synth_budget))
    per = synth_budget / n_synth
    if per < 0.25:
        raise ResourceError(f"synthesis.num_actors={n_synth} leaves {per:.2f} CPUs per actor on a cluster "
                            f"of {total_cpus:g} CPUs; lower synthesis.num_actors (0 fits the cluster)")
    return PoolPlan(n_synth, per, 0.0), PoolPlan(n_annot, annot_cpus, 0.0)


def cluster_state() -> tuple[dict, list[dict]]:
    import ray
    return ray.cluster_resources(), ray.nodes()


def threads_for(num_cpus: float) -> int:
    """Torch threads for an actor holding `num_cpus` Ray CPUs."""
    return max(1, int(round(num_cpus)))


def raise_as_one_line(error: BaseException) -> NoReturn:
    """For an except block around Ray work: raise the UserError inside `error` as its first line
    alone (what the user can fix, without Ray's wrapping and remote traceback), else `error`."""
    user = user_error_in(error)
    if user is None:
        raise error
    raise type(user)(str(user).splitlines()[0]) from None


def user_error_in(error: BaseException) -> Optional[UserError]:
    """The UserError that made a Ray task or actor fail, found through the exceptions Ray wraps
    it in (RayTaskError and its cause, Ray Data's UserCodeException), or None: a model that
    cannot load inside the actors is then one line, as on the driver."""
    seen = set()
    todo = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # ray.exceptions.RayTaskError keeps the original here
        if isinstance(e, UserError) and not isinstance(cause, BaseException):
            return e
        todo += [cause if isinstance(cause, BaseException) else None, e.__cause__, e.__context__]
    return None
