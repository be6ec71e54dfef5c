"""Self-speculative decoding with the multi-token-prediction layers: the output is the main model's (greedy: the
same tokens; sampling: the same distribution), and every draft is what the MTP layers compute on the full
sequence, so the caches of accepted and rejected drafts are kept and dropped correctly."""

import pytest
import torch

import moekit
from moekit import ModelConfig, MoEConfig, RoutingSpec
from moekit.infer.speculative import SpeculationStats, accept_or_resample


def _model(mtp_layers: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    moe = MoEConfig(routing=RoutingSpec(num_experts=8, top_k=2, normalize=True), expert_hidden=32)
    cfg = ModelConfig(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        moe=moe,
        dense_hidden=96,
        moe_layers=(1,),
        mtp_layers=mtp_layers,
        lm_head_bias=True,
    )
    model = moekit.from_config(cfg).double()  # float64: no near-ties between a one-token and a batched pass
    with torch.no_grad():  # a random model rarely agrees with its own drafts; a biased head makes it agree often
        model.lm_head.bias.zero_()
        model.lm_head.bias[:3] = torch.tensor([0.45, 0.4, 0.35])
    return model


def test_greedy_is_the_main_models_continuation_and_drafts_match_the_full_pass():
    model = _model()
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(1))
    head, draft_logits = model.head, []

    def recording_head(h_BTD, mtp_depth=None):  # keeps what each draft was chosen from
        logits = head(h_BTD, mtp_depth)
        if mtp_depth is not None:
            draft_logits.append(logits[0])
        return logits

    model.head = recording_head
    stats = SpeculationStats()
    out = model.generate(ids, 40, speculative=True, stats=stats)
    del model.head
    assert out.tolist() == model.generate(ids, 40).tolist()
    assert stats.tokens == 40 and sum(stats.accepted_by_depth) > 0 and stats.checked_by_depth[1] > 0
    assert stats.rounds == 39 - sum(stats.accepted_by_depth)
    full = model(out, return_mtp=True).mtp_logits
    checked, calls = 0, iter(draft_logits)
    for known, drafts, accepted in stats.history:
        for j, draft in enumerate(drafts):
            logits_V = next(calls)
            # depth j's draft read only real tokens when every earlier draft of its round was accepted
            if j <= accepted:
                torch.testing.assert_close(logits_V, full[j][0, known - 2], rtol=1e-6, atol=1e-6)  # fp32 routing
                assert draft == int(logits_V.argmax())
                checked += 1
    assert checked > stats.rounds


def test_stops_at_max_new_tokens_and_eos():
    model = _model()
    ids = torch.tensor([[5, 6, 7]])
    plain = model.generate(ids, 12)
    for n in (0, 1, 2, 7):
        assert model.generate(ids, n, speculative=True).tolist() == plain[:, : 3 + n].tolist()
    eos = int(plain[0, 6])
    out = model.generate(ids, 12, speculative=True, eos_token_id=eos)
    assert out.tolist() == plain[:, :7].tolist()
    streamed = []
    model.generate(ids, 12, speculative=True, on_token=lambda t: streamed.append(int(t[0])))
    assert streamed == plain[0, 3:].tolist()


def test_sampling_is_seeded_and_draws_valid_tokens():
    model = _model(mtp_layers=2)
    ids = torch.tensor([[1, 2, 3]])
    a = model.generate(ids, 16, speculative=True, temperature=0.9, top_p=0.9, seed=4)
    assert torch.equal(a, model.generate(ids, 16, speculative=True, temperature=0.9, top_p=0.9, seed=4))
    one = model.generate(ids, 16, speculative=True, temperature=1.0, top_k=1, seed=2)
    assert torch.equal(one, model.generate(ids, 16))  # top-k 1 is greedy


def test_accept_or_resample_keeps_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    p_V = torch.tensor([0.5, 0.2, 0.2, 0.1, 0.0])
    q_V = torch.tensor([0.1, 0.1, 0.3, 0.2, 0.3])
    n = 20000
    counts = torch.zeros(5)
    accepted = 0
    for _ in range(n):
        draft = int(torch.multinomial(q_V, 1, generator=g))
        ok, token = accept_or_resample(p_V, q_V, draft, g)
        counts[token] += 1
        accepted += ok
    sigma = (p_V * (1 - p_V) / n).sqrt()
    assert ((counts / n - p_V).abs() <= 4 * sigma + 1e-9).all(), counts / n
    assert abs(accepted / n - torch.minimum(p_V, q_V).sum()) < 0.02  # acceptance = sum min(p, q)


def test_bad_requests_are_refused():
    ids = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="mtp_layers=0"):
        _model(mtp_layers=0).generate(ids, 4, speculative=True)
    model = _model(mtp_layers=1)
    with pytest.raises(ValueError, match="allowed \\[1, tokens"):
        model.generate(torch.tensor([[1, 2], [3, 4]]), 4, speculative=True)
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(ids, 4, speculative=True, attention_mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match="draft_depths"):
        from moekit.infer.speculative import speculative_generate

        speculative_generate(model, ids, 4, draft_depths=2)
