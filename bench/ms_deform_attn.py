"""Benchmark: multi-scale deformable attention, PyTorch reference vs fused kernel.

    python bench/ms_deform_attn.py --device cpu --repeats 5
    python bench/ms_deform_attn.py --device cuda --repeats 20

Prints a table of forward and forward+backward time (median of --repeats runs after one
warm-up run) and peak extra memory for the reference (`grid_sample` per level) and the
fused op, at the Grounding DINO encoder shape (N=2, Lq=900, M=8, D=32, L=4, P=4, levels
100x100, 50x50, 25x25, 13x13) and a small shape. Sampling locations are uniform in
[0, 1] (no spatial locality: the worst case for the caches).

Timing: for each (shape, dtype, mode) one subprocess runs the reference and the fused op
alternately, run by run, so that load changes on a shared machine hit both alike; the
speed-up column compares those paired medians.
Memory: every (shape, implementation, dtype, mode) is measured in a fresh subprocess, so
peak memory is not polluted by allocator caches of earlier runs:
  * CPU: peak resident set size during one run minus the resident size just before it
    (the kernel's high-water mark is reset through /proc/self/clear_refs; falls back to
    ru_maxrss). Inputs are allocated before the baseline, so only the op's own
    allocations (outputs, temporaries, gradients, autograd buffers) count.
  * CUDA: torch.cuda.max_memory_allocated() minus the allocation before the run.
On CUDA the table also reports the relative error (||out - ref||_2 / ||ref||_2) of the
fused bf16 / fp16 output against the fp32 reference.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPES = {
    # Grounding DINO / Deformable DETR encoder at 800x800-ish input (strides 8..64)
    "gd": dict(N=2, Lq=900, M=8, D=32, P=4, levels=[(100, 100), (50, 50), (25, 25), (13, 13)]),
    "small": dict(N=1, Lq=100, M=8, D=32, P=4, levels=[(24, 24), (12, 12), (6, 6), (3, 3)]),
}


# ------------------------------------------------------------------------------ worker
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


def _peak_rss_bytes(reset_ok: bool) -> int:
    if reset_ok:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_inputs(shape: dict, dtype, device, requires_grad: bool, seed: int = 0):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    N, Lq, M, D, P = (shape[k] for k in ("N", "Lq", "M", "D", "P"))
    ss = torch.tensor(shape["levels"], dtype=torch.int64)
    areas = ss[:, 0] * ss[:, 1]
    lsi = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S, L = int(areas.sum()), len(shape["levels"])
    value = torch.randn(N, S, M, D, generator=g).to(device=device, dtype=dtype)
    loc = torch.rand(N, Lq, M, L, P, 2, generator=g).to(device=device, dtype=dtype)
    attn = torch.rand(N, Lq, M, L * P, generator=g).softmax(-1).view(N, Lq, M, L, P)
    attn = attn.to(device=device, dtype=dtype)
    if requires_grad:
        for t in (value, loc, attn):
            t.requires_grad_()
    return value, ss.to(device), lsi.to(device), loc, attn


def worker(args) -> dict:
    """--what mem: peak memory of one run of --impl; --what time: median times of every
    implementation in --impls, interleaved run by run so that load changes on a shared
    machine hit all of them alike."""
    import torch

    sys.path.insert(0, ROOT)
    from engine.ops import kernel_status, ms_deform_attn, ms_deform_attn_reference

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    fns = {"reference": ms_deform_attn_reference, "fused": ms_deform_attn}
    backward = args.mode == "fwdbwd"
    cuda = device.type == "cuda"
    impls = args.impls.split(",")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    # warm up threads / allocator / kernels on a tiny problem first
    for impl in impls:
        tiny = make_inputs(SHAPES["small"], dtype, device, backward)
        out = fns[impl](*tiny)
        if backward:
            out.backward(torch.ones_like(out))
        del out, tiny
    sync()

    inputs = make_inputs(SHAPES[args.shape], dtype, device, backward)
    value, ss, lsi, loc, attn = inputs
    N, Lq, M, D = value.shape[0], loc.shape[1], value.shape[2], value.shape[3]
    grad_out = torch.randn(N, Lq, M * D, generator=torch.Generator().manual_seed(1)).to(device, dtype)

    def run(fn):
        for t in (value, loc, attn):
            t.grad = None
        if backward:
            o = fn(*inputs)
            o.backward(grad_out)
        else:
            with torch.no_grad():
                o = fn(*inputs)
        return o

    res = {"threads": torch.get_num_threads(), "kernels": kernel_status()}
    if args.what == "mem":
        fn = fns[impls[0]]
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            o = run(fn)
            sync()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            base = _rss_bytes()
            ok = _reset_peak_rss()
            o = run(fn)
            peak = _peak_rss_bytes(ok) - base
        del o
        res["peak_mb"] = peak / 2**20
        return res

    times = {impl: [] for impl in impls}
    for impl in impls:  # one untimed run each on the real shape
        del_me = run(fns[impl])
        del del_me
    for _ in range(args.repeats):
        for impl in impls:
            sync()
            t0 = time.perf_counter()
            o = run(fns[impl])
            sync()
            times[impl].append(time.perf_counter() - t0)
            del o
    res["ms"] = {impl: statistics.median(ts) * 1e3 for impl, ts in times.items()}

    if cuda and "fused" in impls and not backward and dtype != torch.float32:
        # relative error of the low-precision fused output vs the fp32 reference
        ref_in = make_inputs(SHAPES[args.shape], torch.float32, device, False)
        with torch.no_grad():
            ref = ms_deform_attn_reference(*ref_in)
            out = ms_deform_attn(*inputs).float()
        res["rel_err"] = ((out - ref).norm() / ref.norm()).item()
    return res


# ------------------------------------------------------------------------------ driver
def measure(args, shape, what, impls, dtype, mode) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--what", what,
           "--device", args.device, "--shape", shape, "--impls", impls, "--dtype", dtype,
           "--mode", mode, "--repeats", str(args.repeats)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(f"worker failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch/OpenMP threads (0: default)")
    p.add_argument("--shapes", default="gd,small", help="comma-separated: gd, small")
    p.add_argument("--json", help="also write the raw results to this file")
    # worker-only arguments
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--what", default="time", help=argparse.SUPPRESS)
    p.add_argument("--shape", default="gd", help=argparse.SUPPRESS)
    p.add_argument("--impls", default="reference,fused", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="fwd", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    # (dtype, implementations timed together); the reference always runs in float32
    groups = [("float32", ["reference", "fused"])]
    if args.device == "cuda":
        groups += [("bfloat16", ["fused"]), ("float16", ["fused"])]
    rows, raw = [], []
    status = None
    for shape in args.shapes.split(","):
        ref_fb = None
        for dtype, impls in groups:
            t_fwd = measure(args, shape, "time", ",".join(impls), dtype, "fwd")
            t_fb = measure(args, shape, "time", ",".join(impls), dtype, "fwdbwd")
            status = t_fb["kernels"]
            for impl in impls:
                m_fwd = measure(args, shape, "mem", impl, dtype, "fwd")["peak_mb"]
                m_fb = measure(args, shape, "mem", impl, dtype, "fwdbwd")["peak_mb"]
                fwd_ms, fb_ms = t_fwd["ms"][impl], t_fb["ms"][impl]
                if impl == "reference":
                    ref_fb = fb_ms
                raw.append({"shape": shape, "impl": impl, "dtype": dtype, "fwd_ms": fwd_ms,
                            "fwdbwd_ms": fb_ms, "fwd_peak_mb": m_fwd, "fwdbwd_peak_mb": m_fb,
                            "rel_err": t_fwd.get("rel_err"), "threads": t_fb["threads"]})
                rows.append([shape, impl, dtype, f"{fwd_ms:.1f}", f"{fb_ms:.1f}", f"{m_fwd:.1f}",
                             f"{m_fb:.1f}", f"{ref_fb / fb_ms:.1f}x" if ref_fb else "-",
                             f"{t_fwd['rel_err']:.1e}" if impl == "fused" and "rel_err" in t_fwd else "-"])

    if args.device == "cuda":
        machine = torch.cuda.get_device_name(0)
    else:
        machine = f"{cpu_model()}, {os.cpu_count()} CPUs, {raw[0]['threads']} torch threads"
    print(f"# ms_deform_attn benchmark: device={args.device} ({machine}), torch {torch.__version__}, "
          f"median of {args.repeats} runs; kernels: cpu={status['cpu']} cuda={status['cuda']}")
    if args.device == "cpu" and not status["cpu"]:
        print("# WARNING: CPU kernel not built: 'fused' is the reference fallback")
    header = ["shape", "impl", "dtype", "fwd ms", "fwd+bwd ms", "fwd peak MiB",
              "fwd+bwd peak MiB", "fwd+bwd speed-up", "rel err vs fp32 ref"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
