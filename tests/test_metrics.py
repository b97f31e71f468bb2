"""sagan_fast.metrics: FID/KID/IS against closed forms, the digits judge, the Evaluator's scores."""

import importlib.util
import math

import pytest
import torch
from torch import nn

from sagan_fast.metrics import (CONFIDENCE_THRESHOLD, DigitsFeatures, Evaluator, InceptionFeatures,
                                class_accuracy, class_coverage, confident_fraction, format_scores,
                                frechet_distance, heldout_split, inception_score, kernel_distance,
                                load_digits_classifier, real_digits)
from sagan_fast.metrics.digits import WEIGHTS_PATH, classify, to_classifier_input
from sagan_fast.metrics.train_digits_classifier import main as train_main
from sagan_fast.metrics.train_digits_classifier import train_classifier


def _torch_fidelity_imports() -> bool:
    if importlib.util.find_spec("torch_fidelity") is None:
        return False
    try:
        import torch_fidelity.feature_extractor_inceptionv3  # noqa: F401
    except Exception:  # installed with a torchvision that does not load against this torch
        return False
    return True


requires_torch_fidelity = pytest.mark.skipif(
    not _torch_fidelity_imports(), reason="torch-fidelity (with a working torchvision) not installed")


# --- FID / KID / IS on known distributions ----------------------------------------------------------

def _rotation(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q


def _samples_with_exact_moments(mean: torch.Tensor, cov: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n samples whose sample mean and unbiased sample covariance are exactly ``mean`` and ``cov``."""
    x = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x - x.mean(0)
    white = torch.linalg.cholesky(torch.cov(x.T))
    x = torch.linalg.solve_triangular(white, x.T, upper=False).T  # sample covariance exactly I
    return x @ torch.linalg.cholesky(cov).T + mean


def test_frechet_distance_matches_the_closed_form_on_gaussians():
    # Covariances sharing eigenvectors Q: FID = |m1 - m2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    d = 5
    q = _rotation(d, 1)
    a = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    b = torch.tensor([1.5, 0.7, 2.0, 5.0, 0.3], dtype=torch.float64)
    m1 = torch.tensor([0.0, 1.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    m2 = torch.tensor([1.0, 1.0, 0.0, 0.5, -1.0], dtype=torch.float64)
    closed = float((m1 - m2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    x = _samples_with_exact_moments(m1, q @ torch.diag(a) @ q.T, 200, seed=2)
    y = _samples_with_exact_moments(m2, q @ torch.diag(b) @ q.T, 300, seed=3)
    assert frechet_distance(x, y) == pytest.approx(closed, rel=1e-6)
    assert frechet_distance(y, x) == pytest.approx(closed, rel=1e-6)
    # Plain samples from the two Gaussians: the estimate converges to the same value.
    g = torch.Generator().manual_seed(4)
    xs = torch.randn(20000, d, generator=g, dtype=torch.float64) @ (q @ torch.diag(a.sqrt())).T + m1
    ys = torch.randn(20000, d, generator=g, dtype=torch.float64) @ (q @ torch.diag(b.sqrt())).T + m2
    assert frechet_distance(xs, ys) == pytest.approx(closed, rel=0.03)
    assert frechet_distance(xs[:10000], xs[10000:]) < 0.01


def test_kernel_distance_is_near_zero_for_one_distribution_and_positive_for_two():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1000, 8, generator=g), torch.randn(1000, 8, generator=g)
    same, same_std = kernel_distance(x, y, subsets=20, subset_size=300)
    shifted, _ = kernel_distance(x, y + 0.5, subsets=20, subset_size=300)
    assert abs(same) < 3 * same_std + 1e-3
    assert shifted > 20 * max(abs(same), same_std)


def test_inception_score_coverage_confidence_and_accuracy_on_known_logits():
    k, n = 10, 1000
    labels = torch.arange(n) % k
    sure = torch.nn.functional.one_hot(labels, k).double() * 50.0  # every sample certain, classes balanced
    assert inception_score(sure)[0] == pytest.approx(k, rel=1e-3)
    assert class_coverage(sure) == pytest.approx(1.0)
    assert confident_fraction(sure) == 1.0
    assert class_accuracy(sure, labels) == 1.0
    assert class_accuracy(sure, (labels + 1) % k) == 0.0
    one_class = torch.zeros(n, k, dtype=torch.float64)
    one_class[:, 3] = 50.0
    assert inception_score(one_class)[0] == pytest.approx(1.0, abs=1e-6)
    assert class_coverage(one_class) == 0.0
    flat = torch.zeros(n, k, dtype=torch.float64)  # 10% each: recognized as nothing
    assert confident_fraction(flat) == 0.0
    two = torch.zeros(n, k, dtype=torch.float64)
    two[: n // 2, 0] = two[n // 2:, 1] = 50.0
    assert class_coverage(two) == pytest.approx(math.log(2) / math.log(k))


def test_scores_reject_bad_features():
    with pytest.raises(ValueError, match="features"):
        frechet_distance(torch.randn(1, 4), torch.randn(5, 4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(torch.full((5, 4), float("nan")), torch.randn(5, 4))


# --- the digits judge -------------------------------------------------------------------------------

@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_shipped_digits_classifier_heldout_accuracy(resolution):
    model = load_digits_classifier()
    images, labels = real_digits(resolution)
    held = heldout_split(labels)[1]
    _, logits = classify(model, images[held])
    accuracy = class_accuracy(logits, labels[held])
    assert accuracy >= 0.97, f"held-out accuracy at {resolution} px: {accuracy:.4f}"
    if resolution == 32:
        assert model.info["heldout_accuracy"] == pytest.approx(accuracy)


def test_heldout_split_is_stratified_disjoint_and_fixed():
    labels = real_digits(32)[1]
    train, held = heldout_split(labels)
    assert len(set(train.tolist()) & set(held.tolist())) == 0 and len(train) + len(held) == len(labels)
    assert torch.bincount(labels[held], minlength=10).min() >= 35
    assert torch.equal(held, heldout_split(labels)[1])


def test_classifier_training_is_deterministic_and_writes_a_loadable_file(tmp_path):
    a, info_a = train_classifier(epochs=1, log=None)
    b, _ = train_classifier(epochs=1, log=None)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert info_a["n_heldout"] + info_a["n_train"] == 1797
    out = tmp_path / "digits.pt"
    assert train_main(["--out", str(out), "--epochs", "1"]) == 0
    loaded = load_digits_classifier(out)
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_digits_classifier_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_digits_classifier(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pt"):
        load_digits_classifier(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="foreign.pt"):
        load_digits_classifier(tmp_path / "foreign.pt")


def test_classifier_input_accepts_any_size_and_rgb():
    images = real_digits(32)[0][:8]
    rgb = images.expand(-1, 3, -1, -1)
    assert torch.allclose(to_classifier_input(rgb), to_classifier_input(images))
    assert to_classifier_input(real_digits(64)[0][:2]).shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="square"):
        to_classifier_input(torch.zeros(2, 2, 16, 16))


def test_confidence_threshold_separates_real_digits_from_noise_and_blends():
    """The documented reason for CONFIDENCE_THRESHOLD: most real digits pass, noise and morphs do not."""
    model = load_digits_classifier()
    images, labels = real_digits(32)
    held = images[heldout_split(labels)[1]]
    g = torch.Generator().manual_seed(0)
    other = held[torch.randperm(len(held), generator=g)]
    noise = torch.rand(500, 1, 32, 32, generator=g) * 2 - 1
    real = confident_fraction(classify(model, held)[1], CONFIDENCE_THRESHOLD)
    blends = confident_fraction(classify(model, (held + other) / 2)[1], CONFIDENCE_THRESHOLD)
    noisy = confident_fraction(classify(model, noise)[1], CONFIDENCE_THRESHOLD)
    assert real >= 0.85 and blends <= 0.3 and noisy <= 0.05, (real, blends, noisy)


# --- the Evaluator ----------------------------------------------------------------------------------

class LookupGenerator(nn.Module):
    """A "generator" returning real digits: of one class only (a perfectly collapsed G), or, when
    conditional, of the class asked for (``shift`` 1: of the next class, always wrong)."""

    def __init__(self, images, labels, only_class=None, n_classes=0, shift=0):
        super().__init__()
        self.z_dim, self.n_classes, self.shift = 16, n_classes, shift
        self.register_buffer("images", images)
        self.labels = labels
        self.only_class = only_class
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, z, y=None):
        pick = (z[:, 0].abs() * 1e4).long()
        if y is None:
            pool = torch.nonzero(self.labels == self.only_class).flatten()
            return self.images[pool[pick % len(pool)]]
        out = []
        for zi, yi in zip(pick, y):
            pool = torch.nonzero(self.labels == (int(yi) + self.shift) % 10).flatten()
            out.append(self.images[pool[zi % len(pool)]])
        return torch.stack(out)


class NoiseGenerator(nn.Module):
    def __init__(self):
        super().__init__()
        self.z_dim, self.n_classes = 1024, 0
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, z, y=None):
        return torch.tanh(z.view(-1, 1, 32, 32))


@pytest.fixture(scope="module")
def digits_evaluator():
    return Evaluator.for_data("digits", resolution=32, n_samples=400, kid_subsets=10)


def test_real_digits_score_near_zero_and_as_well_as_the_reference(digits_evaluator):
    ev = digits_evaluator
    ref = ev.reference
    assert ev.fid_key == "digits/fid"
    assert set(ref) >= {"digits/fid", "digits/kid", "digits/is", "digits/coverage", "digits/confident",
                        "digits/accuracy"}
    assert 0 < ref["digits/fid"] < 5 and abs(ref["digits/kid"]) < 0.1
    assert ref["digits/coverage"] > 0.99 and ref["digits/accuracy"] >= 0.97 and ref["digits/confident"] > 0.85
    images, labels = real_digits(32)
    same = ev.score_images(images)
    assert abs(same["digits/fid"]) < 1e-6
    held = heldout_split(labels)[1]
    heldout = ev.score_images(images[held], labels[held])
    assert heldout["digits/fid"] < 3 * ref["digits/fid"]
    assert heldout["digits/accuracy"] == pytest.approx(ref["digits/accuracy"])


def test_collapsed_and_noise_generators_score_far_worse(digits_evaluator):
    ev = digits_evaluator
    images, labels = real_digits(32)
    collapsed = ev(LookupGenerator(images, labels, only_class=3))
    noise = ev(NoiseGenerator())
    ref = ev.reference
    for scores in (collapsed, noise):
        assert scores["digits/fid"] > 30 * ref["digits/fid"]
        assert scores["digits/kid"] > 30 * ref["digits/kid"]
        assert scores["digits/is"] < 0.3 * ref["digits/is"]
        assert scores["digits/coverage"] < 0.5
    assert collapsed["digits/coverage"] < 0.05  # one digit: no coverage, but each one recognizable
    assert collapsed["digits/confident"] > 0.8
    assert noise["digits/confident"] < 0.05
    assert "digits/accuracy" not in collapsed  # unconditional: no labels to check against
    line = format_scores(noise, ref)
    assert line.startswith("digits FID") and "(real " in line


def test_conditional_accuracy_is_scored_against_the_labels_drawn(digits_evaluator):
    images, labels = real_digits(32)
    right = digits_evaluator(LookupGenerator(images, labels, n_classes=10))
    wrong = digits_evaluator(LookupGenerator(images, labels, n_classes=10, shift=1))
    assert right["digits/accuracy"] > 0.97 and right["digits/coverage"] > 0.99
    assert wrong["digits/accuracy"] < 0.03


def test_scores_are_the_same_on_every_call_and_leave_the_global_rng_alone(digits_evaluator):
    G = NoiseGenerator()
    rng = torch.get_rng_state()
    first = digits_evaluator(G)
    assert torch.equal(torch.get_rng_state(), rng)
    assert digits_evaluator(G) == first
    again = Evaluator.for_data("digits", resolution=32, n_samples=400, kid_subsets=10)
    assert torch.equal(torch.get_rng_state(), rng)  # building one too (the judge's init is overwritten)
    assert again.reference == digits_evaluator.reference
    assert again(G) == first
    assert Evaluator.for_data("digits", resolution=32, n_samples=400, kid_subsets=10, seed=1)(G) != first


def test_evaluator_restores_the_generator_mode(digits_evaluator):
    images, labels = real_digits(32)
    G = LookupGenerator(images, labels, only_class=1).train()
    digits_evaluator(G, n_samples=50)
    assert G.training


def test_missing_or_foreign_inception_file_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.pth.*never downloads"):
        Evaluator.for_data("digits", inception_weights=tmp_path / "missing.pth")
    torch.save({"conv.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth.*not the FID Inception"):
        InceptionFeatures(tmp_path / "other.pth")
    with pytest.raises(ValueError, match="state dict of tensors"):
        InceptionFeatures(WEIGHTS_PATH)  # our digits file: a dict, but not of tensors
    with pytest.raises(ValueError, match="needs Inception weights"):
        Evaluator.for_data(str(tmp_path))


def _random_inception_weights(path):
    """torch-fidelity's Inception-v3 with its random init, saved as the real weights file is laid
    out (a plain state dict): the real network runs end to end without a download."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class RandomInit(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True):  # keep the random init
            return None

    empty = path.with_name("empty.pt")
    torch.save({}, empty)
    net = RandomInit("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    torch.save(net.state_dict(), path)


@requires_torch_fidelity
def test_inception_path_runs_end_to_end_on_a_weights_file_of_the_real_layout(tmp_path):
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    _random_inception_weights(weights)
    images = real_digits(32)[0]
    ev = Evaluator(images[:16], [DigitsFeatures(), InceptionFeatures(weights)], n_samples=16)
    scores = ev(NoiseGenerator())
    for key in ("inception/fid", "inception/kid", "inception/is", "digits/fid"):
        assert math.isfinite(scores[key]) and key in ev.reference


def test_scores_never_sync_across_processes(monkeypatch):
    """Under torchrun a training run scores on rank 0 alone: a torchmetrics all-gather there would wait
    for ranks that never join (it hung the 2-rank run). With a process group up, no score may sync."""
    import torch.distributed as dist
    import torchmetrics.metric

    def no_collectives(*args, **kwargs):
        raise AssertionError("a score tried to sync across processes")

    monkeypatch.setattr(torchmetrics.metric, "gather_all_tensors", no_collectives)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29531")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        gen = torch.Generator().manual_seed(0)
        real, fake = torch.randn(64, 8, generator=gen), torch.randn(64, 8, generator=gen) + 0.5
        assert frechet_distance(real, fake) > 0.1
        assert kernel_distance(real, fake, subsets=3, subset_size=32)[0] > 0
        assert inception_score(torch.randn(64, 10, generator=gen))[0] >= 1
    finally:
        dist.destroy_process_group()
