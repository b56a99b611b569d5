"""Ray Train + DeepSpeed plumbing shared by every trainer (SD fine-tuning, grounding head,
detector): the DeepSpeed config, the TorchTrainer with resume, and checkpoints.

Every trainer has one shape: a worker function `loop(config)` that receives everything it needs
in `config`, and a driver that checks its inputs, connects to Ray, and calls

    result = fit(loop, {"lr": 1e-4, ...}, TrainRunConfig(storage_path, name, num_workers=2),
                 datasets={"train": ray_dataset}, what="detector training")

which raises TrainingError when the run fails after its restarts, and returns the Ray result of
the last checkpoint; the driver writes the trained model from it and returns a `TrainSummary`.

Inside `loop`: `engine = deepspeed_engine(model, params, ds_config)`, then
`start = restore_checkpoint(engine)` (0 on a fresh run), then the steps, calling
`report(metrics, engine, step, extra)` every step (it writes a checkpoint every
`checkpoint_every` steps). Every rank must call `report` at the same steps: Ray Train V2 waits
for all workers' reports and merges their checkpoint files into one directory.

Resume: Ray Train V2 (the default in Ray 2.60; `TorchTrainer.restore` is deprecated there) keeps
its checkpoint bookkeeping under `storage_path/name`. A worker that dies is restarted by
`FailureConfig(max_failures)` and a rerun of the same command with the same storage_path and
name starts from the latest checkpoint: in both cases `ray.train.get_checkpoint()` returns it
and `restore_checkpoint` loads it, so training continues at the saved step, not at 0. The
latest checkpoint is the latest one Ray Train's controller has collected: a worker that dies
within a moment of reporting one can lose it, and the run then repeats at most
`checkpoint_every` more steps.

Checkpoint layout (one directory per checkpoint, all ranks writing into it):
    meta.json              step, caller's `extra`, LR scheduler state, world size, ZeRO stage
    model.safetensors      the trained module's weights (rank 0)
    <name>.safetensors     further named tensor sets (e.g. EMA weights) (rank 0)
    optim-rank<r>.pt       rank r's optimizer partition: the torch optimizer's state and the fp32
                           master weights DeepSpeed keeps (loaded with weights_only=True)
DeepSpeed's own `save_checkpoint` format is not used: it pickles Python objects (loss scaler,
enums), which can only be read with `torch.load(weights_only=False)`, i.e. by running code
from the file.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from engine.config import TrainRunConfig
from engine.errors import UserError

log = logging.getLogger(__name__)

META = "meta.json"
MODEL_FILE = "model.safetensors"


class TrainingConfigError(UserError, ValueError):
    """A training config that cannot run; raised on the driver before any worker starts."""


class TrainingError(RuntimeError):
    """A training run failed on its workers after `max_failures` restarts (not a user error:
    the cause, a worker's exception, is chained)."""


@dataclass
class TrainSummary:
    """What every trainer returns."""
    output: str  # where the trained model was written
    steps: int  # the step of the checkpoint it was written from
    checkpoint: str  # that checkpoint's path (under storage_path/name)
    metrics: dict  # the trainer's figures: last loss, per-epoch counts, throughput, ...
    wall_s: float

    def line(self) -> str:
        loss = self.metrics.get("loss")
        return (f"{self.steps} steps, last loss " + (f"{loss:.4f}" if loss is not None else "n/a")
                + f", {self.wall_s:.1f} s -> {self.output}")


# ---------------------------------------------------------------------------------------------
# DeepSpeed


def deepspeed_config(zero_stage: int, lr: float, weight_decay: float, warmup_steps: int, total_steps: int,
                     bf16: bool, grad_accum: int = 1, batch_per_worker: int = 1, clip: float = 1.0,
                     betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> dict:
    """AdamW with linear warmup then linear decay to 0 at `total_steps`; bf16 only where asked
    (on GPU), fp32 on CPU where bf16 matmuls are slow and gloo all-reduces fp32 anyway."""
    if zero_stage not in (0, 1, 2):
        # Stage 3 partitions the parameters themselves; saving and EMA would then need a gather
        # on every step. The largest model trained here (SD's 860M-parameter UNet) fits one GPU
        # with its optimizer state sharded by stage 2.
        raise TrainingConfigError(f"zero_stage must be 0, 1 or 2, got {zero_stage}")
    if warmup_steps < 0 or total_steps < 1 or warmup_steps > total_steps:
        raise TrainingConfigError(f"need 0 <= warmup_steps ({warmup_steps}) <= total steps ({total_steps})")
    return {
        "train_micro_batch_size_per_gpu": batch_per_worker,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": clip,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": list(betas), "eps": eps,
                                                  "weight_decay": weight_decay}},
        # torch's own AdamW: DeepSpeed's fused CPU Adam needs its C++ op built, and the optimizer
        # is not the bottleneck of a UNet step.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "scheduler": {"type": "WarmupDecayLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": lr, "warmup_num_steps": max(warmup_steps, 1),
            "total_num_steps": total_steps, "warmup_type": "linear"}},
        "bf16": {"enabled": bool(bf16)},
        "zero_optimization": {"stage": zero_stage},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }


def deepspeed_engine(model: torch.nn.Module, ds_config: dict, params=None):
    """`deepspeed.initialize` over the process group Ray Train already set up. The optimizer is
    built here (torch AdamW) from the config, so no DeepSpeed C++ optimizer op is compiled.
    `params`: parameters, or torch param groups (dicts whose own keys override the config's)."""
    import deepspeed
    opt_cfg = ds_config["optimizer"]["params"]
    params = list(params if params is not None else model.parameters())
    if params and isinstance(params[0], dict):  # param groups, e.g. weights decayed and gains not
        params = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
    else:
        params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opt_cfg["lr"], betas=tuple(opt_cfg["betas"]),
                                  eps=opt_cfg["eps"], weight_decay=opt_cfg["weight_decay"])
    config = {k: v for k, v in ds_config.items() if k != "optimizer"}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                           dist_init_required=False)
    return engine


# ---------------------------------------------------------------------------------------------
# Driver side


def check_resources(run: TrainRunConfig, resources: dict, data_cpus: Optional[float] = None) -> None:
    """Ray waits forever (no error) for workers the cluster cannot place: say so up front."""
    data_cpus = run.data_cpus if data_cpus is None else data_cpus
    if run.num_workers < 1:
        raise TrainingConfigError(f"num_workers must be >= 1, got {run.num_workers}")
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    if run.use_gpu and run.num_workers > gpus:
        raise TrainingConfigError(f"num_workers={run.num_workers} asks for {run.num_workers} GPUs but the Ray "
                                  f"cluster has {gpus:g}; lower num_workers or add GPU nodes")
    need = run.num_workers * run.cpus_per_worker + data_cpus
    if need > cpus + 1e-9:
        raise TrainingConfigError(
            f"num_workers={run.num_workers} x cpus_per_worker={run.cpus_per_worker:g} plus {data_cpus:g} CPU "
            f"for data loading needs {need:g} CPUs but the Ray cluster has {cpus:g}; lower num_workers or "
            f"cpus_per_worker")


def run_trainer(train_loop_per_worker: Callable[[dict], None], loop_config: dict, run: TrainRunConfig,
                datasets: Optional[dict] = None, split_datasets: bool = True):
    """Run `train_loop_per_worker` on `run.num_workers` Ray Train workers; resume from the latest
    checkpoint of an earlier run with the same storage_path and name. Returns ray.train.Result.

    Datasets are read in their own order (Ray Data's default is whichever block is ready first), so
    one worker reading a dataset gets the same batches in every run of the same seed. Ray's split
    among several workers deals blocks to whichever asks first: a trainer that needs the same
    batches there too builds one dataset per worker and passes split_datasets=False."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    check_resources(run, ray.cluster_resources())
    storage = _storage_uri(run.storage_path)
    resources = {"CPU": run.cpus_per_worker}
    if run.use_gpu:
        resources["GPU"] = 1
    ordered = DataConfig.default_ingest_options()
    ordered.preserve_order = True
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_config,
        # gloo on CPU (DeepSpeed's CPU path), nccl on GPU.
        torch_config=TorchConfig(backend="nccl" if run.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=run.num_workers, use_gpu=run.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(storage_path=storage, name=run.name,
                             failure_config=FailureConfig(max_failures=run.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets=datasets or {}, dataset_config=DataConfig(datasets_to_split="all" if split_datasets else [],
                                                           execution_options=ordered))
    if not _train_v2():
        # Ray Train V1 (RAY_TRAIN_V2_ENABLED=0) only resumes through an explicit restore.
        path = f"{storage.rstrip('/')}/{run.name}"
        if TorchTrainer.can_restore(path):
            trainer = TorchTrainer.restore(path, train_loop_per_worker=train_loop_per_worker,
                                           train_loop_config=loop_config, datasets=datasets or {})
    return trainer.fit()


def fit(train_loop_per_worker: Callable[[dict], None], loop_config: dict, run: TrainRunConfig,
        datasets: Optional[dict] = None, what: str = "training", split_datasets: bool = True):
    """run_trainer, with the failure handling every trainer shares: a run that failed after its
    restarts, or ended without a checkpoint to write the model from, raises TrainingError."""
    result = run_trainer(train_loop_per_worker, loop_config, run, datasets, split_datasets)
    if result.error is not None:
        raise TrainingError(f"{what} failed after {run.max_failures} restarts: {result.error}") from result.error
    if result.checkpoint is None:
        raise TrainingError(f"{what} under {run.storage_path}/{run.name} finished without a checkpoint")
    return result


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or mean) of `tensor` over the training workers; the tensor itself outside a process
    group. NCCL reduces only CUDA tensors: keep it on the model's device."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        if op == "mean":
            tensor /= dist.get_world_size()
    return tensor


def _train_v2() -> bool:
    # Ray's documented switch (RAY_TRAIN_V2_ENABLED, on unless set to 0), read the way Ray reads it.
    return os.environ.get("RAY_TRAIN_V2_ENABLED", "1").strip().lower() not in ("0", "false")


def _storage_uri(path: str) -> str:
    # Ray Train needs an absolute local path (workers may run in another directory) or a URI.
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


# ---------------------------------------------------------------------------------------------
# Worker side: checkpoints


def _unwrap(engine_or_model):
    return getattr(engine_or_model, "module", engine_or_model)


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _optimizer_parts(engine_or_model, optimizer=None):
    """(torch optimizer, list of fp32 master tensors) behind a DeepSpeed engine or a plain pair."""
    opt = optimizer if optimizer is not None else getattr(engine_or_model, "optimizer", None)
    if opt is None:
        return None, []
    inner = opt if isinstance(opt, torch.optim.Optimizer) else getattr(opt, "optimizer", opt)
    # ZeRO 1/2 keep fp32 masters of this rank's partition; the bf16 optimizer of stage 0 too.
    masters = getattr(opt, "single_partition_of_fp32_groups", None) or \
        getattr(opt, "fp32_groups_flat_partition", None) or []
    return inner, list(masters)


def save_checkpoint(engine_or_model, step: int, extra: Optional[dict], directory: str, optimizer=None,
                    lr_scheduler=None, tensors: Optional[dict[str, dict[str, torch.Tensor]]] = None) -> str:
    """Write this rank's part of a checkpoint into `directory` (see the module docstring)."""
    from safetensors.torch import save_file
    rank, world = _rank_world()
    os.makedirs(directory, exist_ok=True)
    inner, masters = _optimizer_parts(engine_or_model, optimizer)
    if inner is not None:
        torch.save({"optimizer": inner.state_dict(), "masters": [m.detach().cpu() for m in masters]},
                   os.path.join(directory, f"optim-rank{rank}.pt"))
    if rank == 0:
        module = _unwrap(engine_or_model)
        # clone(): safetensors refuses tensors that share memory, and some models tie weights
        # (Deformable DETR shares its class and box heads across decoder layers).
        save_file({k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
                  os.path.join(directory, MODEL_FILE))
        for name, state in (tensors or {}).items():
            save_file({k: v.detach().cpu().clone() for k, v in state.items()},
                      os.path.join(directory, f"{name}.safetensors"))
        sched = lr_scheduler if lr_scheduler is not None else getattr(engine_or_model, "lr_scheduler", None)
        meta = {"step": int(step), "extra": extra or {}, "world_size": world,
                "lr_scheduler": sched.state_dict() if sched is not None else None}
        with open(os.path.join(directory, META), "w") as f:
            json.dump(meta, f)
    return directory


def read_meta(directory: str) -> dict:
    with open(os.path.join(directory, META)) as f:
        return json.load(f)


def latest_checkpoint_step(checkpoint=None) -> int:
    """The step saved in `checkpoint` (default: ray.train.get_checkpoint()); 0 when there is none."""
    if checkpoint is None:
        import ray.train
        checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as d:
        return int(read_meta(d)["step"])


def load_tensors(directory: str, name: str) -> Optional[dict[str, torch.Tensor]]:
    from safetensors.torch import load_file
    path = os.path.join(directory, f"{name}.safetensors")
    return load_file(path) if os.path.exists(path) else None


def restore_checkpoint(engine_or_model, checkpoint=None, optimizer=None, lr_scheduler=None,
                       on_load: Optional[Callable[[str, dict], None]] = None) -> int:
    """Load the latest checkpoint (default: ray.train.get_checkpoint()) into the model, its
    optimizer partition and LR scheduler; returns the step to continue from (0 if none).
    `on_load(directory, meta)` lets the caller read its own files (e.g. EMA weights)."""
    from safetensors.torch import load_file
    if checkpoint is None:
        import ray.train
        checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    rank, world = _rank_world()
    with checkpoint.as_directory() as d:
        meta = read_meta(d)
        module = _unwrap(engine_or_model)
        state = load_file(os.path.join(d, MODEL_FILE))
        own = module.state_dict()
        module.load_state_dict({k: v.to(own[k].dtype) if k in own else v for k, v in state.items()})
        inner, masters = _optimizer_parts(engine_or_model, optimizer)
        path = os.path.join(d, f"optim-rank{rank}.pt")
        if inner is not None and meta["world_size"] == world and os.path.exists(path):
            saved = torch.load(path, map_location="cpu", weights_only=True)
            inner.load_state_dict(saved["optimizer"])
            for dst, src in zip(masters, saved["masters"]):
                dst.data.copy_(src.to(dst.device, dst.dtype))
        elif inner is not None:
            # The optimizer partitions follow the world size: with another one, keep the weights
            # and start the optimizer afresh rather than load a mismatched shard.
            log.warning("checkpoint was written by %s workers, this run has %s: optimizer state reset",
                        meta["world_size"], world)
        sched = lr_scheduler if lr_scheduler is not None else getattr(engine_or_model, "lr_scheduler", None)
        if sched is not None and meta.get("lr_scheduler"):
            sched.load_state_dict(meta["lr_scheduler"])
        if hasattr(engine_or_model, "global_steps"):
            # DeepSpeed counts steps for its accumulation boundaries and LR schedule.
            engine_or_model.global_steps = int(meta["step"])
        if on_load:
            on_load(d, meta)
    return int(meta["step"])


# A ray.train.report costs about 2 s on a 2-core machine (Ray Train V2 waits for the controller
# to collect it), 60x a tiny model's training step: metrics without a checkpoint go out only
# every REPORT_EVERY steps.
REPORT_EVERY = 50


def report(metrics: dict, engine_or_model, step: int, checkpoint_every: int, extra: Optional[dict] = None,
           last: bool = False, tensors: Optional[Callable[[], dict]] = None, optimizer=None) -> None:
    """ray.train.report the metrics: every `checkpoint_every` steps (and at the last step) with a
    checkpoint, every REPORT_EVERY steps without. Called by every rank at every step, so that all
    ranks report at the same steps, as Ray Train requires."""
    import ray.train
    from ray.train import Checkpoint
    if step % max(checkpoint_every, 1) == 0 or last:
        with tempfile.TemporaryDirectory(prefix="ckpt-") as d:
            save_checkpoint(engine_or_model, step, extra, d, optimizer=optimizer,
                            tensors=tensors() if tensors else None)
            ray.train.report({**metrics, "step": step}, checkpoint=Checkpoint.from_directory(d))
    elif step % REPORT_EVERY == 0:
        ray.train.report({**metrics, "step": step})


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
