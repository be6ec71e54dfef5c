"""What temperature, top-k and top-p keep and how they scale: hand cases, and transformers' logits processors (the
reference users compare against) on random logits."""

import pytest
import torch

from moekit.infer.sampling import distribution, filtered_logits, sample

transformers = pytest.importorskip("transformers")


def test_hand_cases():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    torch.testing.assert_close(filtered_logits(logits, 2.0, 0, 1.0), logits / 2)  # temperature divides
    kept = filtered_logits(logits, 1.0, 2, 1.0)
    assert torch.isfinite(kept).tolist() == [[True, True, False, False]]  # top-k 2 keeps the two best
    p = logits.softmax(-1)[0]  # 0.644, 0.237, 0.087, 0.032
    for top_p, n in ((0.5, 1), (0.64, 1), (0.65, 2), (0.9, 3), (0.99, 4)):  # the smallest prefix reaching top_p
        assert int(torch.isfinite(filtered_logits(logits, 1.0, 0, top_p)).sum()) == n, top_p
    assert float(p[0]) == pytest.approx(0.6439, abs=1e-4)
    renormalised = distribution(logits, 1.0, 2, 1.0)[0]
    torch.testing.assert_close(renormalised[:2], p[:2] / p[:2].sum())
    assert distribution(logits, 0.0, 0, 1.0).tolist() == [[1.0, 0.0, 0.0, 0.0]]  # greedy: one-hot argmax
    assert sample(logits, 0.0, 0, 1.0, None).tolist() == [0]


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.8, 10, 0.9)])
def test_filters_equal_transformers_processors(temperature, top_k, top_p):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    processors = transformers.LogitsProcessorList()
    if temperature != 1.0:
        processors.append(transformers.TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(transformers.TopKLogitsWarper(top_k))
    if top_p < 1.0:
        processors.append(transformers.TopPLogitsWarper(top_p))
    want = processors(torch.zeros(6, 1, dtype=torch.long), logits.clone())
    got = filtered_logits(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    torch.testing.assert_close(got.softmax(-1), want.softmax(-1))


def test_sampling_follows_the_filtered_distribution():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -5.0]])
    probs = distribution(logits, 0.9, 3, 0.95)[0]
    draws = torch.stack([sample(logits, 0.9, 3, 0.95, torch.Generator().manual_seed(i)) for i in range(4000)])
    freq = torch.bincount(draws.view(-1), minlength=5).float() / 4000
    assert freq[3:].sum() == 0  # outside top-k never drawn
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)
