"""The KV cache: growing buffers read back exactly what a concatenation of every step would hold."""

import pytest
import torch

from moekit.infer.cache import KVCache


def test_cache_grows_past_its_room_and_truncates():
    torch.manual_seed(0)
    cache, keys, values = KVCache(), [], []
    for step, t in enumerate([5, 1, 60, 1, 1, 100, 3]):  # prefill, decode steps, chunks past each buffer's room
        k, v = torch.randn(2, 4, t, 8), torch.randn(2, t, 16)
        keys.append(k), values.append(v)
        got_k, got_v = cache.extend(0, (2, 1), k, v)
        cache.length += t
        assert torch.equal(got_k, torch.cat(keys, 2)) and torch.equal(got_v, torch.cat(values, 1)), step
    assert cache.nbytes() == (2 * 4 * 8 + 2 * 16) * 4 * cache.length
    cache.truncate(7)  # speculative decoding rejects tokens: the next ones overwrite them
    k, v = torch.randn(2, 4, 2, 8), torch.randn(2, 2, 16)
    got_k, got_v = cache.extend(0, (2, 1), k, v)
    assert torch.equal(got_k, torch.cat((torch.cat(keys, 2)[:, :, :7], k), 2))
    assert torch.equal(got_v, torch.cat((torch.cat(values, 1)[:, :7], v), 1))


def test_cache_refuses_a_layer_that_missed_earlier_tokens():
    cache = KVCache()
    cache.extend(0, (1,), torch.randn(1, 3, 4))
    cache.length = 3
    with pytest.raises(ValueError, match="layer 1 has no cache"):
        cache.extend(1, (1,), torch.randn(1, 1, 4))
