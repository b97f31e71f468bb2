"""Whole SAGAN training step (one D update + one G update, hinge loss, TTUR Adam): ours against
plain PyTorch steps of the same architecture, measured side by side in one run.

Configurations (rows), each at every resolution and precision asked for. Every row is the one
training step, ``sagan_fast.train.step.GANStep`` (the training loop's), with other options or on
other models (``ROWS`` below):

- ``fast``: our models (fused SN, our attention op), the step's speed options on: bf16 autocast or
  fp32, channels_last, D once on cat([real, fake]), no D weight gradients in the G step,
  torch.compile on CUDA. ``fast_eager``: the same without torch.compile (on a GPU: what
  compilation buys). ``--cuda-graphs`` adds ``fast_graphs`` (the whole step as one CUDA graph, no
  compile) and ``fast_graphs_compiled`` (both): these rows decide the default by measurement.
- ``plain_sdpa`` / ``plain_naive``: models with torch's SN parametrization and SDPA or naive
  bmm+softmax attention, every speed option off (``step.PLAIN``): eager, the textbook step (D on
  real then on fake, D's gradients computed in the G step).
- ``plain_cached``: the same with torch's SN inside ``parametrize.cached()`` (one power iteration
  per step instead of one per forward), SDPA; ``plain_cached_compiled``: the same under
  torch.compile (default mode): the strongest plain-PyTorch configuration with SN (GPU only by
  default: Inductor on a CPU takes minutes to compile).

After timing, every row's models must pass ``sagan_fast.nn.assert_normalized`` (the largest singular
value of every W / sigma within ``SN_TOLERANCE`` of 1): the run fails, after printing the table, if
any row's step skipped the power iteration, so no speed figure comes from a step that did not
normalize.

Same models (same seed), same losses, same optimizers (Adam, lr 1e-4 / 4e-4, betas (0, 0.9);
``fused=True`` on CUDA for every row). fp32 rows allow TF32 (``torch.set_float32_matmul_precision
("high")``, cuDNN's default) for every row alike. Columns: median ms per step, images/s (batch /
step time: one D and one G update on ``--batch`` real images), peak MiB allocated over the whole
measurement, models and optimizer state included (CUDA), kernels run per step (CUDA,
torch.profiler), speedup against ``plain_sdpa`` and against the fastest plain row of the same size.
For the CUDA-graph rows "launches" counts the kernels inside the graph: the CPU launches one graph
per step.

``--ddp``: the fast step under torchrun with 2 processes (nccl, one GPU each, when the machine has 2
GPUs; else gloo on CPU): per-process images/s against 1 process. It launches itself through
``torch.distributed.run``; the equivalent command is
``torchrun --standalone --nproc_per_node=2 bench/train_step.py --ddp-worker OUT.json ...``.

Also (unless ``--no-data``) the input pipeline: a folder of random PNGs prepared with
``sagan_fast.train.prepared_data`` and read by the training loop's ``BatchSource`` (uint8 batches,
flip and scaling on the device): images/s it sustains, to compare with the step's (data_headroom).

Usage::

    python bench/train_step.py --quick                # GPU: 128 px bf16, 3 rows; CPU: tiny sizes
    python bench/train_step.py --resolutions 32,64,128 --ch 64 --batch 64 --cuda-graphs --ddp

The GPU check of issue #6 (one run of at most 8 minutes; the first steps of a compiled row are
compilation, ~1-2 minutes each)::

    python bench/train_step.py --quick --json bench/results/train_step-quick.json
    python -m sagan_fast.train.prepared_data RANDOM_PNGS /tmp/prep --resolution 128   # or --data digits
    python train_ddp.py --data /tmp/prep --resolution 128 --ch 64 --batch-size 64 --precision bf16 \
        --steps 200 --log-every 50 --no-progress --out /tmp/run128

On a machine with no GPU everything runs on the CPU at small sizes and the report says so: CPU
numbers say nothing about the GPU targets.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import Report, card_info, count_kernel_launches, default_device, say, time_fn  # noqa: E402

from sagan_fast.models import ModelConfig, build_models  # noqa: E402
from sagan_fast.nn.spectral_norm import SpectralNormError, assert_normalized  # noqa: E402
from sagan_fast.train.step import PLAIN, PRECISIONS, GANStep  # noqa: E402

OURS = dict(sn_impl="sagan_fast", attention_impl="sagan_fast")
TORCH_SDPA = dict(sn_impl="torch", attention_impl="sdpa")
TORCH_NAIVE = dict(sn_impl="torch", attention_impl="naive")
# Row -> (how the models are built, GANStep options). Every row is the one step object; a plain row
# is it with every speed option off (step.PLAIN) on models with torch's SN and plain attention.
# compile=None: --compile decides (on CUDA by default).
ROWS: dict[str, tuple[dict, dict]] = {
    "fast": (OURS, dict(compile=None)),
    "fast_eager": (OURS, dict(compile=False)),
    "fast_graphs": (OURS, dict(compile=False, cuda_graphs=True)),
    "fast_graphs_compiled": (OURS, dict(compile=True, cuda_graphs=True)),
    "plain_sdpa": (TORCH_SDPA, PLAIN),
    "plain_naive": (TORCH_NAIVE, PLAIN),
    "plain_cached": (TORCH_SDPA, dict(PLAIN, parametrize_cached=True)),
    "plain_cached_compiled": (TORCH_SDPA, dict(PLAIN, parametrize_cached=True, compile=True)),
}
CONFIGS = tuple(ROWS)
PLAIN_CONFIGS = tuple(c for c in CONFIGS if c.startswith("plain"))
LR_G, LR_D, BETAS = 1e-4, 4e-4, (0.0, 0.9)
# Largest singular value of W / sigma allowed after timing: 1 +- this. Not 0.02: with one power
# iteration per step, ours and torch's SN alike reach 1.04 on the CPU-sized models after 8 steps
# (D's attention value conv: a square orthogonal init, all singular values equal, so u, v take
# many steps to find the top one). A skipped update need not drift past it (sigma moves only at
# second order in the weight change: 0.041 against 0.039 after 8 CPU-sized steps with every update
# skipped); assert_normalized's power-iteration residual check is what catches it.
SN_TOLERANCE = 0.05


def build(config: str, resolution: int, ch: int, n_classes: int, attn: int | None, device: torch.device):
    model = ModelConfig(resolution=resolution, ch=ch, z_dim=128, n_classes=n_classes,
                        attn_resolution=attn or 0, **ROWS[config][0])
    torch.manual_seed(0)
    G, D = (m.to(device) for m in build_models(model, image_channels=3))
    fused = {"fused": True} if device.type == "cuda" else {}
    opt_G = torch.optim.Adam(G.parameters(), lr=LR_G, betas=BETAS, **fused)
    opt_D = torch.optim.Adam(D.parameters(), lr=LR_D, betas=BETAS, **fused)
    return G, D, opt_G, opt_D


def make_step(config: str, G, D, opt_G, opt_D, real, y, precision: str, compile_fast: bool):
    options = dict(ROWS[config][1])
    if options.get("compile", False) is None:
        options["compile"] = compile_fast
    step = GANStep(G, D, opt_G, opt_D, precision=precision, **options)
    if step.channels_last:  # the layout the training loop's prepared batches arrive in
        real = real.contiguous(memory_format=torch.channels_last)
    return lambda: step([(real, y)])


def check_normalized(config: str, G, D) -> str | None:
    """None if every SN weight of the timed models is normalized (see assert_normalized), else why not."""
    if ROWS[config][0]["sn_impl"] == "none":
        return None
    try:
        assert_normalized([G, D], tol=SN_TOLERANCE)
    except SpectralNormError as err:
        return str(err)
    return None


def measure(config: str, resolution: int, precision: str, args, device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    G, D, opt_G, opt_D = build(config, resolution, args.ch, args.n_classes, args.attn_resolution or None,
                               device)
    gen = torch.Generator(device=device).manual_seed(1)
    real = torch.rand(args.batch, 3, resolution, resolution, device=device, generator=gen) * 2 - 1
    y = torch.randint(args.n_classes, (args.batch,), device=device, generator=gen) if args.n_classes else None
    step = make_step(config, G, D, opt_G, opt_D, real, y, precision, args.compile)
    t0 = time.perf_counter()
    for _ in range(args.warmup):  # compilation, autotuning, CUDA graph capture happen here
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    warm_s = time.perf_counter() - t0
    t = time_fn(step, device=device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, cpu_reps=args.reps)
    row = dict(config=config, resolution=resolution, precision=precision, ch=args.ch, batch=args.batch,
               ms_per_step=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
               images_per_s=args.batch / (t.median_ms / 1e3),
               launches=count_kernel_launches(step, device), warmup_s=warm_s)
    if device.type == "cuda":
        # Everything the run held at its peak: weights, optimizer state, activations, a CUDA
        # graph's private pool (which a peak measured over one replay would miss).
        row["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    row["finite"] = all(bool(torch.isfinite(v)) for v in step().values())
    # No figure from a step that skipped the power iteration: main() fails if a row has an sn_error.
    row["sn_error"] = check_normalized(config, G, D)
    row["sn_normalized"] = row["sn_error"] is None
    del G, D, opt_G, opt_D, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return row


def add_ratios(rows: list[dict]) -> None:
    for r in rows:
        same = [o for o in rows if (o["resolution"], o["precision"]) == (r["resolution"], r["precision"])]
        base = next((o for o in same if o["config"] == "plain_sdpa"), None)
        plain = [o["ms_per_step"] for o in same if o["config"] in PLAIN_CONFIGS]
        r["speedup_vs_plain"] = base["ms_per_step"] / r["ms_per_step"] if base else None
        r["speedup_vs_best_plain"] = min(plain) / r["ms_per_step"] if plain else None


# --- input pipeline -----------------------------------------------------------------------------------

def measure_data(resolution: int, batch: int, workers: int, device: torch.device, n_batches: int) -> dict:
    """Images/s of the training loop's batch source on a prepared folder of random PNGs: loader
    workers gathering uint8 batches, then flips and scaling on the device."""
    import numpy as np
    from PIL import Image

    from sagan_fast.train import DataConfig, DistInfo, ModelConfig, TrainConfig
    from sagan_fast.train.data import BatchSource
    from sagan_fast.train.prepared_data import prepare

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        rng = np.random.default_rng(0)
        n_images = max(2 * batch, 64)
        for i in range(n_images):
            pixels = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(src / f"{i}.png")
        t0 = time.perf_counter()
        prepare(src, Path(tmp) / "prepared", resolution, workers=min(workers, 4), quiet=True)
        prepare_s = time.perf_counter() - t0
        data = DataConfig(data=str(Path(tmp) / "prepared"), batch_size=batch, workers=workers)
        cfg = TrainConfig(model=ModelConfig(resolution=resolution), data=data)
        source = BatchSource(cfg, DistInfo(device=device))
        next(source)  # worker start-up outside the timing
        t0, done = time.perf_counter(), 0
        for _ in range(n_batches):
            done += next(source)[0].shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        del source  # its worker processes, before the folder goes
    return dict(config="data_loader", resolution=resolution, precision="uint8", batch=batch, workers=workers,
                images_per_s=done / dt, ms_per_step=dt / n_batches * 1e3,
                prepare_images_per_s=n_images / prepare_s)


# --- DDP -----------------------------------------------------------------------------------------------

def ddp_worker(args) -> None:
    """Runs under torchrun (or alone): times the fast step, rank 0 writes per-process images/s."""
    import torch.distributed as dist

    from sagan_fast.train.distributed import DistInfo, wrap_ddp

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = args.device_type == "cuda"
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    res = args.resolutions[0]
    G, D, opt_G, opt_D = build("fast", res, args.ch, args.n_classes, args.attn_resolution or None, device)
    info = DistInfo(rank=rank, local_rank=local, world_size=world, device=device)
    G_ddp, D_ddp = wrap_ddp(G, info), wrap_ddp(D, info)  # the training loop's DDP settings
    precision = args.precisions[-1]
    step = GANStep(G_ddp, D_ddp, opt_G, opt_D, precision=precision, compile=use_cuda and args.compile)
    real = torch.rand(args.batch, 3, res, res, device=device) * 2 - 1
    real = real.contiguous(memory_format=torch.channels_last)
    y = torch.randint(args.n_classes, (args.batch,), device=device) if args.n_classes else None
    for _ in range(args.warmup):
        step([(real, y)])
    n = max(args.reps, 3)
    if world > 1:
        dist.barrier()
    if use_cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(n):
        stats = step([(real, y)])
    float(stats["loss_d"])  # waits for the device
    dt = time.perf_counter() - t0
    assert_normalized([G, D], tol=SN_TOLERANCE)  # no figure from a step that skipped the power iteration
    if world > 1:
        dist.destroy_process_group()
    if rank == 0:
        Path(args.ddp_worker).write_text(json.dumps(dict(
            processes=world, backend=("nccl" if use_cuda else "gloo") if world > 1 else None,
            device=str(device), resolution=res, precision=precision, batch=args.batch,
            ms_per_step=dt / n * 1e3, images_per_s_per_process=args.batch * n / dt)))


def _without_flag(argv: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def run_ddp(args, argv: list[str], report: Report) -> None:
    # One GPU per process (nccl refuses two ranks on one GPU): with fewer than 2 GPUs both the 1- and
    # the 2-process runs go to the CPU (gloo), so the two are comparable.
    ddp_device = "cuda" if torch.cuda.device_count() >= 2 else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for nproc in (1, 2):
            out = Path(tmp) / f"ddp{nproc}.json"
            worker_args = _without_flag(argv, "--device") + ["--device", ddp_device, "--ddp-worker", str(out)]
            worker_args = [a for a in worker_args if a != "--ddp"]
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   str(Path(__file__).resolve())] + worker_args
            say(f"ddp: {' '.join(cmd)}")
            threads = os.environ.get("OMP_NUM_THREADS", "1")
            subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS=threads))
            results.append(json.loads(out.read_text()))
        one = results[0]["images_per_s_per_process"]
        for r in results:
            report.add(config=f"ddp_{r['processes']}proc", resolution=r["resolution"],
                       precision=r["precision"], batch=r["batch"], ms_per_step=r["ms_per_step"],
                       images_per_s=r["images_per_s_per_process"],
                       ddp_backend=r["backend"], ddp_device=r["device"],
                       ddp_efficiency=r["images_per_s_per_process"] / one)


# --- main ------------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="GPU: 128 px, fewer configs; CPU: the tiny default")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--resolutions", default=None,
                   help="comma-separated from 32,64,128 (default GPU 32,64,128; CPU 32)")
    p.add_argument("--precisions", default=None,
                   help="comma-separated from fp32,bf16 (default both; --quick on a GPU: bf16, the target's)")
    p.add_argument("--ch", type=int, default=None, help="width multiplier (default GPU 64, CPU 4)")
    p.add_argument("--batch", type=int, default=None, help="real images per step (default GPU 64, CPU 4)")
    p.add_argument("--n-classes", type=int, default=0, help="0: unconditional")
    p.add_argument("--attn-resolution", type=int, default=None,
                   help="feature-map side of the attention layers (default 32; CPU 16; 0: none)")
    p.add_argument("--configs", default=None, help=f"comma-separated from {','.join(CONFIGS)} "
                   "(default: fast + every plain one; CPU: no compiled plain row)")
    p.add_argument("--cuda-graphs", action="store_true", help="also the fast_graphs(_compiled) rows")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile in the 'fast' row (default: on CUDA only)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first (compile, autotune, capture)")
    p.add_argument("--reps", type=int, default=5, help="timed steps on CPU (GPU: do_bench decides)")
    p.add_argument("--warmup-ms", type=float, default=200)
    p.add_argument("--rep-ms", type=float, default=None,
                   help="do_bench measuring time per row (default 1000, --quick 300)")
    p.add_argument("--ddp", action="store_true", help="also the 1- vs 2-process DDP rows (torchrun)")
    p.add_argument("--ddp-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-data", action="store_true", help="skip the input-pipeline row")
    p.add_argument("--data-workers", type=int, default=None,
                   help="loader workers (default 8 on GPU, 1 on CPU)")
    p.add_argument("--json", default=None,
                   help="output path (default: bench/results/train_step-<card>-<time>.json)")
    args = p.parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    gpu = device.type == "cuda"
    args.device_type = device.type
    if not args.resolutions:
        args.resolutions = ("128" if args.quick else "32,64,128") if gpu else "32"
    args.resolutions = [int(r) for r in args.resolutions.split(",")]
    args.precisions = (args.precisions or ("bf16" if args.quick and gpu else "fp32,bf16")).split(",")
    for prec in args.precisions:
        if prec not in PRECISIONS:
            p.error(f"--precisions: {prec!r} is not one of {PRECISIONS}")
    args.ch = args.ch or (64 if gpu else 4)
    args.batch = args.batch or (64 if gpu else 4)
    if args.attn_resolution is None:
        args.attn_resolution = 32 if gpu else 16
    if args.configs:
        args.configs = args.configs.split(",")
        bad = [c for c in args.configs if c not in CONFIGS]
        if bad:
            p.error(f"--configs: unknown {bad}; choose from {CONFIGS}")
    else:
        if args.quick:  # GPU: ours, the eager baseline and the strongest plain one (fits the 8-minute check)
            args.configs = ["fast", "plain_sdpa", "plain_cached_compiled" if gpu else "plain_cached"]
        else:
            args.configs = (["fast"] + (["fast_eager"] if gpu else [])
                            + ["plain_sdpa", "plain_naive", "plain_cached"]
                            + (["plain_cached_compiled"] if gpu else []))
        if args.cuda_graphs and gpu:
            args.configs[1:1] = ["fast_graphs", "fast_graphs_compiled"]
    args.compile = gpu if args.compile is None else args.compile
    args.rep_ms = args.rep_ms if args.rep_ms is not None else (300 if args.quick else 1000)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    args.data_workers = args.data_workers if args.data_workers is not None else (8 if gpu else 1)
    return args, device


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, device = parse_args(argv)
    if args.ddp_worker:
        ddp_worker(args)
        return 0
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    card = card_info(device)
    settings = {k: v for k, v in vars(args).items() if k not in ("ddp_worker", "device_type")}
    report = Report("train_step", card, settings)
    if device.type != "cuda":
        say(f"no GPU: CPU run at small sizes ({card['name']}); these numbers say nothing about the GPU "
            "targets")
    for res in args.resolutions:
        for precision in args.precisions:
            for config in args.configs:
                say(f"{config} {res}px {precision} ch={args.ch} batch={args.batch} ...")
                try:
                    report.add(**measure(config, res, precision, args, device))
                except Exception as exc:  # a failing baseline (e.g. compile of torch SN) is a result too
                    say(f"  {config} failed: {exc!r}"[:500])
                    report.add(config=config, resolution=res, precision=precision, ch=args.ch,
                               batch=args.batch, error=repr(exc)[:300])
    add_ratios([r for r in report.rows if "ms_per_step" in r])
    if not args.no_data:
        row = measure_data(args.resolutions[-1], args.batch, args.data_workers, device,
                           n_batches=20 if device.type == "cuda" else 3)
        fast = [r["images_per_s"] for r in report.rows
                if r.get("config", "").startswith("fast") and r.get("resolution") == row["resolution"]
                and "images_per_s" in r]
        # > 1: the loader delivers images faster than the fastest step consumes them.
        row["data_headroom"] = row["images_per_s"] / max(fast) if fast else None
        report.add(**row)
    if args.ddp:
        run_ddp(args, argv, report)
    columns = ["config", "resolution", "precision", "ms_per_step", "images_per_s", "peak_mib", "launches",
               "speedup_vs_plain", "speedup_vs_best_plain", "sn_normalized", "data_headroom",
               "ddp_efficiency", "error"]
    columns = [c for c in columns if any(r.get(c) is not None for r in report.rows)]
    print(report.markdown(columns))
    if device.type != "cuda":
        print("\nCPU run (no GPU): small sizes; not comparable with the GPU targets.")
    path = report.save_json(args.json)
    say(f"wrote {path}")
    unnormalized = {f"{r['config']} {r['resolution']}px {r['precision']}": r["sn_error"]
                    for r in report.rows if r.get("sn_error")}
    if unnormalized:  # the figures above came from steps that did not normalize: they are not results
        raise SpectralNormError(f"{len(unnormalized)} timed row(s) left spectral norm un-normalized: "
                                f"{unnormalized}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
