import math

import pytest
import torch

from visionmoe.routing import losses


def test_importance_golden():
    # Imp = column sums = [0.75, 0.75, 0.5]; mean 2/3; deviations 1/12, 1/12, -1/6
    # population var = (1 + 1 + 4) / 144 / 3 = 1/72; CV^2 = (1/72) / (4/9) = 1/32.
    gates = torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]])
    assert losses.importance_loss(gates).item() == pytest.approx(1 / 32, abs=1e-7)


def test_load_golden():
    # clean l = [1, 0], noisy = [1.5, 0.2], K=1 -> thr = 1.5, sigma = 1.
    # P0 = 1 - Phi(0.5) = 0.3085375, P1 = 1 - Phi(1.5) = 0.0668072
    # mean = 0.1876724, pop std = (P0 - P1) / 2 = 0.1208652 -> CV^2 = 0.4147647.
    logits = torch.tensor([[1.0, 0.0]])
    noisy = torch.tensor([[1.5, 0.2]])
    p0, p1 = 1 - 0.5 * (1 + math.erf(0.5 / math.sqrt(2))), 1 - 0.5 * (1 + math.erf(1.5 / 2**0.5))
    expected = ((p0 - p1) / 2 / ((p0 + p1) / 2)) ** 2
    assert expected == pytest.approx(0.4147647, abs=1e-6)
    assert losses.load_loss(logits, noisy, 1.0, 1).item() == pytest.approx(expected, abs=1e-6)


def test_load_threshold_is_kth_noisy_logit_over_all_experts():
    # K=2, noisy = [3.0, 1.2, 2.0] -> thr = 2.0 (2nd largest noisy logit, over all experts).
    # sigma = 0.5, clean = [1.5, 1.0, 1.8]: P = 1 - Phi((thr - l) / sigma) = 1 - Phi([1, 2, 0.4])
    # = [0.158655, 0.022750, 0.344578]; mean 0.175328, pop var 0.0174012 -> CV^2 = 0.566080.
    # (Threshold 3.0 (K=1), 1.5 (K-th clean logit) or 1.2 (K-th of the others) all differ.)
    logits = torch.tensor([[1.5, 1.0, 1.8]])
    noisy = torch.tensor([[3.0, 1.2, 2.0]])
    p = [1 - 0.5 * (1 + math.erf(z / math.sqrt(2))) for z in (1.0, 2.0, 0.4)]
    mean = sum(p) / 3
    expected = sum((q - mean) ** 2 for q in p) / 3 / mean**2
    assert expected == pytest.approx(0.566080, abs=1e-6)
    assert losses.load_loss(logits, noisy, 0.5, 2).item() == pytest.approx(expected, rel=1e-5)


def test_gshard_golden():
    # top-1 fractions f = [1, 0]; mean gates = [0.65, 0.35]; E^2 * mean(f * P) = 4 * 0.325 = 1.3.
    gates = torch.tensor([[0.7, 0.3], [0.6, 0.4]])
    assert losses.gshard_loss(gates).item() == pytest.approx(1.3, abs=1e-6)
    # A uniform router gives exactly 1.
    assert losses.gshard_loss(torch.full((4, 4), 0.25)).item() == pytest.approx(1.0)


def test_z_loss_golden():
    # logsumexp([0, 0]) = log 2 -> (log 2)^2 = 0.480453.
    assert losses.z_loss(torch.zeros(3, 2)).item() == pytest.approx(math.log(2) ** 2, abs=1e-6)


def test_group_inputs_give_one_value_per_group():
    g = torch.softmax(torch.randn(5, 7, 4), -1)
    for fn in (losses.importance_loss, losses.gshard_loss, losses.z_loss):
        out = fn(g)
        assert out.shape == (5,)
        assert torch.allclose(out[2], fn(g[2]))
    noisy = g + 0.1
    out = losses.load_loss(g, noisy, 0.25, 2)
    assert out.shape == (5,) and torch.allclose(out[1], losses.load_loss(g[1], noisy[1], 0.25, 2))


def test_load_matches_monte_carlo_k2_distinct_logits():
    # Load_e = mean_s P[s, e], P[s, e] = chance that l[s, e] + fresh noise clears thr_s, the K-th
    # largest noisy logit of token s over all experts (held fixed, as the spec says). Estimate P
    # by sampling that fresh noise, form CV^2(Load) in float64, and compare with load_loss.
    gen = torch.Generator().manual_seed(0)
    sigma, k = 0.3, 2
    logits = torch.tensor(
        [[0.9, 0.1, -0.4, 0.5, 0.0], [-0.2, 0.7, 0.3, -0.6, 0.2], [0.4, -0.1, 0.8, 0.6, -0.3]],
        dtype=torch.float64,
    )
    noisy = logits + sigma * torch.randn(logits.shape, generator=gen, dtype=torch.float64)
    thr = torch.tensor([sorted(row.tolist(), reverse=True)[k - 1] for row in noisy])[:, None]
    hits = torch.zeros_like(logits)
    draws = 200_000
    for _ in range(4):
        fresh = torch.randn((draws, *logits.shape), generator=gen, dtype=torch.float64)
        hits += (logits + sigma * fresh > thr).double().sum(0)
    load = (hits / (4 * draws)).mean(0)
    cv2_mc = (load.var(unbiased=False) / load.mean() ** 2).item()
    got = losses.load_loss(logits.float(), noisy.float(), sigma, k).item()
    assert got == pytest.approx(cv2_mc, rel=0.01)
    # The same noisy logits with another K give a clearly different loss: K matters here.
    assert losses.load_loss(logits.float(), noisy.float(), sigma, 1).item() != pytest.approx(
        cv2_mc, rel=0.05
    )


def test_load_needs_positive_noise():
    with pytest.raises(ValueError, match="0.0"):
        losses.load_loss(torch.zeros(2, 2), torch.zeros(2, 2), 0.0, 1)
