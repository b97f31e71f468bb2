"""The training step (sagan_fast.train.step.GANStep, fast and plain), the prepared dataset, and
bench/train_step.py.

CPU-sized: the smallest models the architecture allows (32 px, ch 4), a few steps each.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sagan_fast.models import Discriminator, Generator
from sagan_fast.nn.spectral_norm import spectral_norm_layers
from sagan_fast.train import hinge_loss_d, hinge_loss_g
from sagan_fast.train.data import (DataError, ImageFolderDataset, ShardedBatchSampler, infinite_batches,
                                   make_loader)
from sagan_fast.train.prepared_data import (PreparedDataset, is_prepared, main as prepare_main, prepare,
                                            to_training_batch)
from sagan_fast.train.step import PLAIN, GANStep, _make_capturable

from utils import assert_close_report, requires_cuda

ROOT = Path(__file__).resolve().parents[1]
LR_G, LR_D = 1e-3, 2e-3
Z_DIM = 16


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def tiny_gan(seed: int, n_classes: int, device="cpu", sgd: bool = False):
    torch.manual_seed(seed)
    G = Generator(resolution=32, ch=4, z_dim=Z_DIM, n_classes=n_classes, attn_resolution=16).to(device)
    D = Discriminator(resolution=32, ch=4, n_classes=n_classes, attn_resolution=16).to(device)
    if sgd:
        return G, D, torch.optim.SGD(G.parameters(), lr=LR_G), torch.optim.SGD(D.parameters(), lr=LR_D)
    # Adam eps 1e-4 instead of 1e-8: an exactly-cancelling gradient (a bias feeding a batch norm, a
    # D channel whose real and fake terms cancel) is float32 rounding noise of up to ~1e-6 that eps
    # 1e-8 turns into a step of ~lr in either direction (beta1 = 0: update = lr g / (|g| + eps)), so
    # two correct implementations would differ by 2 lr there; with 1e-4 noise moves < 1e-2 lr. Real
    # gradients of these tiny models are ~1e-2..1, so their updates are as with the default eps.
    opt_G = torch.optim.Adam(G.parameters(), lr=LR_G, betas=(0.0, 0.9), eps=1e-4)
    opt_D = torch.optim.Adam(D.parameters(), lr=LR_D, betas=(0.0, 0.9), eps=1e-4)
    return G, D, opt_G, opt_D


def batches(n: int, size: int, n_classes: int, device="cpu"):
    g = torch.Generator().manual_seed(123)
    out = []
    for _ in range(n):
        real = torch.rand(size, 3, 32, 32, generator=g) * 2 - 1
        y = torch.randint(n_classes, (size,), generator=g) if n_classes else None
        out.append((real.to(device), y.to(device) if y is not None else None))
    return out


def textbook_step(G, D, opt_G, opt_D, reals, n_classes):
    """The plain step as written in a GAN tutorial: D on real, then on fake, one backward; then G,
    D's gradients computed too; NCHW; no hooks. Same noise draws in the same order."""
    for real, y_real in reals:
        z = torch.randn(real.shape[0], Z_DIM)
        y_fake = torch.randint(n_classes, (real.shape[0],)) if n_classes else None
        with torch.no_grad():
            fake = G(z, y_fake)
        d_real, d_fake = D(real, y_real), D(fake, y_fake)
        loss_d = hinge_loss_d(d_real, d_fake)
        opt_D.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_D.step()
    z = torch.randn(real.shape[0], Z_DIM)
    y = torch.randint(n_classes, (real.shape[0],)) if n_classes else None
    loss_g = hinge_loss_g(D(G(z, y), y))
    opt_G.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_G.step()
    return loss_d.detach(), loss_g.detach()


def bn_cancelled(name: str) -> bool:
    """G's block conv biases: each feeds a batch norm, which subtracts it again, so its true gradient
    is 0 and what reaches it is rounding noise (~1e-7); Adam (beta1 = 0) turns any noise into a step
    of ~lr. Two correct implementations then differ there by up to 2 lr per step."""
    return name.startswith("G.blocks.") and name.endswith(".bias")


def compare_models(a, b, steps: int, where: str):
    """Weights and SN vectors of two (G, D) pairs after ``steps`` fp32 steps from the same start.

    Stated tolerance: every element within 1e-4 abs + 1e-4 rel. The two steps convolve in different
    memory layouts and sum D's batch differently (one call on cat([real, fake]) or two), so
    gradients differ by float32 rounding (~1e-6 relative, up to ~1e-6 absolute where a gradient
    cancels exactly; Adam's eps is raised in tiny_gan so those stay small); an Adam update is
    ~lr = 1e-3 per element and step, so a wrong gradient, loss or skipped update is caught.
    G's block conv biases feed a batch norm, which cancels them: their whole gradient is rounding
    noise, so there only a bound of 2 lr per step is checked.
    """
    (Ga, Da), (Gb, Db) = a, b
    def named(G, D):
        return ([(f"G.{n}", p) for n, p in G.named_parameters()]
                + [(f"D.{n}", p) for n, p in D.named_parameters()])
    named_a, named_b = named(Ga, Da), dict(named(Gb, Db))
    checked = 0
    for name, pa in named_a:
        pb = named_b[name]
        if bn_cancelled(name):
            assert (pa - pb).abs().max() <= 2 * LR_G * steps + 1e-6, f"{where}: {name}"
            continue
        assert_close_report(pa, pb, atol=1e-4, rtol=1e-4, name=f"{where}: {name}")
        checked += 1
    assert checked > 40
    for model_a, model_b in ((Ga, Gb), (Da, Db)):
        for (sa, _), (sb, _) in zip(spectral_norm_layers(model_a), spectral_norm_layers(model_b)):
            assert_close_report(sa._u, sb._u, atol=1e-4, rtol=0, name=f"{where}: SN u")


def run_steps(step, data: list, steps: int, d_steps: int) -> list[tuple[float, float]]:
    """(loss_d, loss_g) of ``steps`` calls of ``step``, each on the next ``d_steps`` batches of ``data``."""
    torch.manual_seed(5)
    out = []
    for i in range(steps):
        stats = step(data[i * d_steps:(i + 1) * d_steps])
        assert set(stats) == {"loss_d", "loss_g", "d_real", "d_fake"}
        assert all(not v.requires_grad and v.ndim == 0 for v in stats.values())
        out.append((stats["loss_d"].item(), stats["loss_g"].item()))
    return out


@pytest.mark.parametrize("n_classes,d_steps", [(3, 1), (0, 2)], ids=["conditional", "uncond-2-d-steps"])
def test_fast_step_matches_plain_steps_fp32(n_classes, d_steps):
    steps, size = 3, 3  # odd batch
    data = batches(steps * d_steps, size, n_classes)

    G, D, opt_G, opt_D = tiny_gan(0, n_classes)
    step = GANStep(G, D, opt_G, opt_D, precision="fp32", compile=False, d_steps=d_steps)
    assert step.channels_last and step.d_on_cat and step.freeze_d  # the fast path's options
    fast = run_steps(step, data, steps, d_steps)

    G2, D2, opt_G2, opt_D2 = tiny_gan(0, n_classes)
    torch.manual_seed(5)
    plain = [textbook_step(G2, D2, opt_G2, opt_D2, data[i * d_steps:(i + 1) * d_steps], n_classes)
             for i in range(steps)]

    G3, D3, opt_G3, opt_D3 = tiny_gan(0, n_classes)
    plain_ours = run_steps(GANStep(G3, D3, opt_G3, opt_D3, precision="fp32", d_steps=d_steps, **PLAIN),
                           data, steps, d_steps)
    assert not any(m._forward_pre_hooks for m in G3.modules() if isinstance(m, torch.nn.Conv2d))

    for i, ((fd, fg), (pd, pg), (ld, lg)) in enumerate(zip(fast, plain, plain_ours)):
        for name, ours, ref in (("loss_d", fd, pd.item()), ("loss_g", fg, pg.item()),
                                ("loss_d vs plain", fd, ld), ("loss_g vs plain", fg, lg)):
            assert abs(ours - ref) <= 1e-4 * (1 + abs(ref)), f"step {i} {name}: {ours} vs {ref}"
    compare_models((G, D), (G2, D2), steps, "fast vs textbook")
    compare_models((G, D), (G3, D3), steps, "fast vs plain GANStep")
    # Every speed option off, the step does the textbook's operations in the textbook's order.
    assert plain_ours == [(d.item(), g.item()) for d, g in plain]
    for a, b in zip([*G3.state_dict().values(), *D3.state_dict().values()],
                    [*G2.state_dict().values(), *D2.state_dict().values()]):
        assert torch.equal(a, b)
    # D's parameters are trainable again after the G step switched them off.
    assert all(p.requires_grad for p in D.parameters())


def test_compiled_fast_step_matches_eager():
    """torch.compile through our torch.library ops (aot_eager: Inductor is too slow on this CPU)."""
    torch._dynamo.reset()
    data = batches(2, 2, 3)
    results = []
    for compile in (False, True):
        G, D, opt_G, opt_D = tiny_gan(1, 3)
        step = GANStep(G, D, opt_G, opt_D, precision="fp32", compile=compile, compile_backend="aot_eager")
        torch.manual_seed(9)
        losses = [step([(r, y)]) for r, y in data]
        results.append((G, D, [(s["loss_d"].item(), s["loss_g"].item()) for s in losses]))
    (Ga, Da, la), (Gb, Db, lb) = results
    for (a_d, a_g), (b_d, b_g) in zip(la, lb):
        assert abs(a_d - b_d) <= 1e-4 * (1 + abs(b_d)) and abs(a_g - b_g) <= 1e-4 * (1 + abs(b_g))
    compare_models((Ga, Da), (Gb, Db), 2, "compiled vs eager")
    torch._dynamo.reset()


def test_bf16_step_on_cpu_is_close_to_fp32():
    """bf16 autocast: the first D loss depends only on the initial weights, so it must match fp32
    within bf16's resolution (8 bits of mantissa, ~4e-3 relative per op; 5e-2 over the network);
    weights stay float32 and keep training."""
    (real, y), = batches(1, 4, 3)
    firsts = {}
    for precision in ("fp32", "bf16"):
        G, D, opt_G, opt_D = tiny_gan(2, 3)
        step = GANStep(G, D, opt_G, opt_D, precision=precision, compile=False)
        torch.manual_seed(3)
        s = step([(real, y)])
        firsts[precision] = s["loss_d"].item()
        assert all(torch.isfinite(v) for v in s.values())
        assert all(p.dtype == torch.float32 for p in list(G.parameters()) + list(D.parameters()))
    assert abs(firsts["bf16"] - firsts["fp32"]) <= 5e-2 * (1 + abs(firsts["fp32"])), firsts


def test_step_input_errors():
    G, D, opt_G, opt_D = tiny_gan(0, 3)
    with pytest.raises(ValueError, match="precision"):
        GANStep(G, D, opt_G, opt_D, precision="fp16")
    with pytest.raises(ValueError, match="d_steps"):
        GANStep(G, D, opt_G, opt_D, d_steps=0)
    with pytest.raises(ValueError, match="CUDA"):
        GANStep(G, D, opt_G, opt_D, cuda_graphs=True)
    step = GANStep(G, D, opt_G, opt_D, precision="fp32", d_steps=2)
    real, y = torch.zeros(3, 3, 32, 32), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="list of d_steps=2 .* got 1 item"):
        step([(real, y)])
    with pytest.raises(ValueError, match="list of d_steps=2"):
        step(real)
    with pytest.raises(ValueError, match="one shape"):
        step([(real, y), (real[:2], y[:2])])
    with pytest.raises(ValueError, match="y must be given"):
        step([(real, None), (real, None)])
    with pytest.raises(ValueError, match="float"):
        step([(real.long(), y), (real, y)])
    with pytest.raises(ValueError, match="pair"):
        step([real, real])
    step.close()
    assert not any(m._forward_pre_hooks for m in G.modules() if isinstance(m, torch.nn.Conv2d))


def test_make_capturable_moves_adam_step_counters_and_refuses_others():
    G, D, opt_G, opt_D = tiny_gan(0, 0)
    opt_G.state[next(G.parameters())]["step"] = torch.tensor(3.0)  # as Adam leaves it after a step
    _make_capturable(opt_G)
    assert all(group["capturable"] for group in opt_G.param_groups)
    assert opt_G.state[next(G.parameters())]["step"].device == next(G.parameters()).device
    with pytest.raises(ValueError, match="capturable"):
        _make_capturable(torch.optim.SGD(D.parameters(), lr=0.1))


# --- under DDP -----------------------------------------------------------------------------------

def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One rank: fast steps and plain steps on DDP-wrapped copies of the same tiny GAN."""
    import torch.distributed as dist

    from sagan_fast.train.distributed import DistInfo, wrap_ddp
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    info = DistInfo(rank=rank, world_size=world)
    data = batches(2 * world, 2, 3)[rank::world]  # each rank its own real images
    results = {}
    for name, options in (("fast", {"compile": False}), ("plain", PLAIN)):
        # SGD: Adam turns the float32 rounding noise of near-zero gradient elements (summed over
        # ranks in another order by the two D calls) into steps of up to ~lr (seen: 0.3 lr after 2
        # steps); SGD keeps a rounding difference a rounding difference, so a wrong gradient shows.
        G, D, opt_G, opt_D = tiny_gan(0, 3, sgd=True)  # same init on every rank (as the loop does)
        G_ddp, D_ddp = wrap_ddp(G, info), wrap_ddp(D, info)
        torch.manual_seed(100 + rank)  # per-rank noise, as the loop does
        step = GANStep(G_ddp, D_ddp, opt_G, opt_D, precision="fp32", **options)
        losses = [step([(real, y)])["loss_d"].item() for real, y in data]
        results[name] = {"losses": losses, "G": G.state_dict(), "D": D.state_dict()}
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_fast_step_under_ddp_matches_plain_and_keeps_ranks_equal(tmp_path):
    """2 processes (gloo): the fast step on DDP-wrapped models equals the plain one on them (the
    plain one calls the DDP-wrapped D twice before one backward), and both ranks end with identical
    weights and SN vectors."""
    import torch.multiprocessing as mp
    # fork: the children inherit the imported modules instead of importing torch again (seconds each).
    ctx = mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                             join=False, start_method="fork")
    deadline = time.monotonic() + 300  # a hung rank must fail the test, not hang CI
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("DDP ranks did not finish within 300 s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for rank in ranks:
        for a, b in zip(rank["fast"]["losses"], rank["plain"]["losses"]):
            assert abs(a - b) <= 1e-4 * (1 + abs(b))
        for model in ("G", "D"):
            for key, value in rank["fast"][model].items():
                ref = rank["plain"][model][key]
                if value.is_floating_point():  # SGD: float32 rounding apart (~1e-7), the same weights
                    assert_close_report(value, ref, atol=1e-5, rtol=1e-5,
                                        name=f"DDP fast vs plain: {model}.{key}")
    for model in ("G", "D"):
        for key, value in ranks[0]["fast"][model].items():
            if "running" in key or "num_batches" in key:
                continue  # G's batch-norm statistics are per rank (no SyncBatchNorm)
            assert torch.equal(value, ranks[1]["fast"][model][key]), f"ranks differ in {model}.{key}"


# --- GPU-only checks ------------------------------------------------------------------------------

@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("compile,cuda_graphs", [(False, False), (True, False), (False, True)],
                         ids=["eager", "compiled", "cuda-graphs"])
def test_gpu_step_has_no_host_sync(compile, cuda_graphs):
    """After warm-up (compilation, cuDNN autotuning and lazy state may sync), a step makes no
    host-device sync."""
    torch._dynamo.reset()
    G, D, opt_G, opt_D = tiny_gan(0, 3, "cuda")
    step = GANStep(G, D, opt_G, opt_D, precision="bf16", compile=compile, cuda_graphs=cuda_graphs)
    data = batches(7, 8, 3, "cuda")
    for real, y in data[:4]:
        step([(real, y)])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for real, y in data[4:]:
            stats = step([(real, y)])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(v).item() for v in stats.values())
    step.check_spectral_norms()


@requires_cuda
@pytest.mark.gpu
def test_gpu_cuda_graph_step_matches_eager_and_bf16_is_close():
    data = batches(5, 8, 3, "cuda")
    runs = {}
    for name, kwargs in (("eager", {}), ("graphs", {"cuda_graphs": True})):
        G, D, opt_G, opt_D = tiny_gan(0, 3, "cuda")
        step = GANStep(G, D, opt_G, opt_D, precision="fp32", compile=False, **kwargs)
        torch.manual_seed(4)
        runs[name] = (G, D, [step([(r, y)])["loss_d"].item() for r, y in data])
    for a, b in zip(runs["eager"][2], runs["graphs"][2]):
        assert abs(a - b) <= 1e-3 * (1 + abs(b))
    G, D, opt_G, opt_D = tiny_gan(0, 3, "cuda")
    step = GANStep(G, D, opt_G, opt_D, precision="bf16", compile=False)
    torch.manual_seed(4)
    first = step(data[:1])["loss_d"].item()
    assert abs(first - runs["eager"][2][0]) <= 5e-2 * (1 + abs(first))


# --- prepared data --------------------------------------------------------------------------------

@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (w, h, mode) in enumerate([(37, 29, "RGB"), (20, 45, "RGB"), (33, 33, "L"), (41, 23, "RGBA")]):
        arr = rng.integers(0, 256, (h, w, {"RGB": 3, "L": 1, "RGBA": 4}[mode]), dtype=np.uint8)
        img = Image.fromarray(arr[..., 0] if mode == "L" else arr, mode=mode)
        img.save((root / "sub" if i % 2 else root) / f"img{i}.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_prepare_round_trips_and_skips_unreadable(image_folder, tmp_path, workers):
    dst = tmp_path / "prepared"
    with pytest.warns(UserWarning, match="broken.jpg"):
        index = prepare(image_folder, dst, 16, workers=workers, chunk=2, quiet=True)
    assert (index["count"], index["skipped"]) == (4, 1) and index["skipped_files"][0].endswith("broken.jpg")
    assert is_prepared(dst) and not list(tmp_path.glob(".prepared*"))  # no temporary left behind
    ds = PreparedDataset(dst, 16)
    folder = ImageFolderDataset(image_folder, 16)
    readable = [i for i, f in enumerate(folder.files) if f.name != "broken.jpg"]
    assert len(ds) == 4
    for j, i in enumerate(readable):  # the same pixels, in the same (sorted) order
        expected = folder.load(i)
        img, label, skipped = ds[j]
        assert (img.dtype, tuple(img.shape), label, skipped) == (torch.uint8, (16, 16, 3), 0, 0)
        batch = to_training_batch(img[None], flip=False)
        assert batch.dtype == torch.float32 and batch.is_contiguous(memory_format=torch.channels_last)
        # The folder dataset's float pixels exactly (k / 127.5 - 1 both ways; 1e-6: float32 rounding).
        assert_close_report(batch[0], expected, atol=1e-6, rtol=0, name=f"image {j}")


def test_prepare_refuses_existing_overwrites_atomically_and_cli(image_folder, tmp_path, capsys):
    dst = tmp_path / "p"
    with pytest.warns(UserWarning):
        prepare(image_folder, dst, 8, workers=0, quiet=True)
    with pytest.raises(FileExistsError):
        prepare(image_folder, dst, 8, workers=0, quiet=True)
    with pytest.warns(UserWarning):
        argv = [str(image_folder), str(dst), "--resolution", "12", "--workers", "0", "--overwrite"]
        assert prepare_main(argv) == 0
    assert "4 images at 12 px, 1 unreadable" in capsys.readouterr().out
    with pytest.raises(DataError, match="prepared at 12 px"):
        PreparedDataset(dst, 8)
    with pytest.raises(DataError, match="not a prepared dataset"):
        PreparedDataset(image_folder)
    assert prepare_main([str(tmp_path / "missing"), str(tmp_path / "q"), "--resolution", "8"]) == 2
    assert not (tmp_path / "q").exists()


def test_prepared_loader_batches_shards_and_flips(image_folder, tmp_path):
    dst = tmp_path / "p"
    with pytest.warns(UserWarning):
        prepare(image_folder, dst, 8, workers=0, quiet=True)
    ds = PreparedDataset(dst)
    seen = []
    for rank in range(2):
        sampler = ShardedBatchSampler(len(ds), 2, rank=rank, world_size=2, seed=0)
        it = infinite_batches(make_loader(ds, sampler, workers=0, pin_memory=False, seed=0), sampler)
        images, labels, skipped = next(it)
        assert images.shape == (2, 8, 8, 3) and labels.tolist() == [0, 0] and skipped.sum() == 0
        assert sampler.state_dict() == {"epoch": 1, "batch": 0}  # one batch per rank per epoch
        seen += [bytes(x.numpy()) for x in images]
    assert len(set(seen)) == 4  # the two ranks saw disjoint images, all of them
    x = torch.from_numpy(np.array(ds.images[:4]))
    flipped = to_training_batch(x, flip=True, generator=torch.Generator().manual_seed(1))
    plain = to_training_batch(x, flip=False)
    mirrored = [torch.equal(f, p.flip(2)) and not torch.equal(f, p) for f, p in zip(flipped, plain)]
    kept = [torch.equal(f, p) for f, p in zip(flipped, plain)]
    assert all(m or k for m, k in zip(mirrored, kept)) and any(mirrored)
    with pytest.raises(ValueError, match="uint8"):
        to_training_batch(plain)


# --- the benchmark --------------------------------------------------------------------------------

@pytest.fixture
def bench_module():
    spec = importlib.util.spec_from_file_location("bench_train_step", ROOT / "bench" / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(ROOT / "bench"))


BENCH_QUICK = ["--quick", "--resolutions", "32", "--ch", "4", "--batch", "2", "--precisions", "fp32",
               "--configs", "fast,plain_sdpa", "--reps", "1", "--no-data"]


def test_bench_quick_runs_on_cpu_and_writes_json(bench_module, tmp_path):
    out = tmp_path / "r.json"
    bench_module.main(BENCH_QUICK + ["--json", str(out)])
    report = json.loads(out.read_text())
    assert "CPU" in report["card"]["name"] and report["card"]["note"]
    rows = {r["config"]: r for r in report["rows"]}
    assert set(rows) == {"fast", "plain_sdpa"}
    for r in rows.values():
        assert r["ms_per_step"] > 0 and r["images_per_s"] > 0 and r["resolution"] == 32
        assert r["sn_normalized"] is True and r["sn_error"] is None
    assert rows["plain_sdpa"]["speedup_vs_plain"] == pytest.approx(1.0)


def test_bench_fails_when_a_timed_step_left_spectral_norm_unnormalized(bench_module, tmp_path, monkeypatch):
    """The check sees a weight whose u, v no longer match it (as after a skipped power iteration),
    for our SN and torch's, and the bench then fails after writing its table."""
    for config in ("fast", "plain_sdpa"):
        G, D, _, _ = bench_module.build(config, 32, 4, 0, 16, torch.device("cpu"))
        assert bench_module.check_normalized(config, G, D) is None
        with torch.no_grad():
            for p in D.parameters():
                if p.ndim > 1:
                    p.add_(torch.randn_like(p))  # a new direction: the stored u, v are stale for it
        assert "did not normalize" in bench_module.check_normalized(config, G, D)
    monkeypatch.setattr(bench_module, "check_normalized", lambda config, G, D: "stale u, v")
    out = tmp_path / "r.json"
    from sagan_fast.nn import SpectralNormError
    with pytest.raises(SpectralNormError, match="2 timed row.*stale u, v"):
        bench_module.main(BENCH_QUICK + ["--json", str(out)])
    assert all(r["sn_normalized"] is False for r in json.loads(out.read_text())["rows"])


# --- the training loop on the fast path -------------------------------------------------------------

def test_training_loop_runs_fast_step_on_prepared_data(image_folder, tmp_path):
    """train() with the default --step-impl fast, reading a prepared folder (uint8 batches, flips on
    the device), and the plain step from the same seed: both finish; the first logged losses agree
    (the same math; d_steps=1, so the same draws in the same order)."""
    from sagan_fast.train import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig, train

    dst = tmp_path / "prepared"
    with pytest.warns(UserWarning):
        prepare(image_folder, dst, 32, workers=0, quiet=True)
    first = {}
    for impl in ("fast", "plain"):
        cfg = TrainConfig(model=ModelConfig(resolution=32, ch=4, z_dim=16, attn_resolution=16),
                          data=DataConfig(data=str(dst), batch_size=2, workers=0),
                          optim=OptimConfig(step_impl=impl),
                          run=RunConfig(steps=2, out=str(tmp_path / impl), log_every=1, ckpt_every=2,
                                        sample_every=2, n_samples=4, progress=False))
        result = train(cfg)
        assert result.step == 2 and result.images_per_s is not None and result.images_per_s > 0
        first[impl] = json.loads((tmp_path / impl / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("loss_d", "loss_g"):
        plain = first["plain"][key]
        assert abs(first["fast"][key] - plain) <= 1e-4 * (1 + abs(plain)), (key, first)
