"""The runtime expert cache: a model whose budget holds two experts per MoE layer gives the resident model's logits
and greedy tokens under every policy, with and without prefetch; per-expert and stacked (biased, transposed)
checkpoints; prompts needing more experts than the pool has slots; bad budgets, changed files and read checks."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

import moekit
from moekit.checkpoint.expert_files import ExpertReadError
from moekit.cli.main import main
from moekit.infer.eviction import Eviction
from moekit.infer.expert_cache import resident_bytes
from moekit.infer.generate import generate
from moekit.infer.tokenizers import ByteTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import hf_tiny_model  # noqa: E402

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """transformers' tiny Qwen3-MoE (one tensor per expert and projection): 4 MoE layers x 8 experts, top-2."""
    path = tmp_path_factory.mktemp("qwen3")
    hf_tiny_model("qwen3_moe", path, mlp_only_layers=[])
    return path


def _budget(path: Path, per_layer: float) -> int:
    """The budget that leaves `per_layer` experts' room per MoE layer beside the resident part."""
    model = moekit.from_pretrained(path, expert_memory=10**9)
    blocks = model.moe_blocks()
    expert = next(iter(blocks.values())).experts.expert_bytes()
    model.expert_cache.close()
    return resident_bytes(model) + int(per_layer * len(blocks)) * expert


def _resident(path: Path, ids: torch.Tensor, new: int = 12):
    model = moekit.from_pretrained(path)
    tokens = generate(model, ids, new)
    model.drop_fused()  # the offloaded blocks run the modules: compare the same path bit for bit
    with torch.no_grad():
        return tokens, model(tokens)


@pytest.mark.parametrize("policy", ["lru", "lfu", "lfu-decay"])
@pytest.mark.parametrize("prefetch", [False, True])
def test_two_experts_per_layer_give_the_resident_model_s_output(qwen3, policy, prefetch):
    ids = torch.randint(3, 90, (1, 10), generator=torch.Generator().manual_seed(1))
    tokens, logits = _resident(qwen3, ids)
    model = moekit.from_pretrained(qwen3, expert_memory=_budget(qwen3, 2), expert_policy=policy, prefetch=prefetch)
    cache = model.expert_cache
    assert cache.slots == 2 * 4
    assert torch.equal(generate(model, ids, 12), tokens)
    with torch.no_grad():
        assert torch.equal(model(tokens), logits)
    cache.drain()
    s = cache.stats.summary()
    assert s["misses"] > 0 and s["hits"] > 0 and s["hits"] + s["misses"] > 4 * 2 * 11  # 11 decode steps
    expert = next(iter(model.moe_blocks().values())).experts.expert_bytes()
    assert s["bytes_read"] == (s["misses"] + s["prefetched"] - s["prefetch_cancelled"]) * expert
    assert (s["prefetched"] > 0) == prefetch and ("prefetch_precision" in s) == prefetch
    cache.close()


def test_stacked_biased_transposed_experts_and_prompts_wider_than_the_pool(tmp_path):
    """gpt-oss files stack each layer's experts ([E, D, 2F] with biases); a 24-token prompt needs all 8 experts of a
    layer with 3 slots: the layer runs in rounds that fit, combined in the plan's order."""
    hf_tiny_model("gpt_oss", tmp_path)
    ids = torch.randint(3, 90, (1, 24), generator=torch.Generator().manual_seed(2))
    tokens, logits = _resident(tmp_path, ids, 6)
    model = moekit.from_pretrained(tmp_path, expert_memory=_budget(tmp_path, 0.75))
    assert model.expert_cache.slots == 3
    assert torch.equal(generate(model, ids, 6), tokens)
    with torch.no_grad():
        assert torch.equal(model(tokens), logits)


def test_a_budget_holding_everything_misses_each_expert_once(qwen3):
    model = moekit.from_pretrained(qwen3, expert_memory="1GB", prefetch=False)
    assert model.expert_cache.slots == 32
    ids = torch.randint(3, 90, (1, 40), generator=torch.Generator().manual_seed(3))
    generate(model, ids, 30)
    generate(model, ids, 30)
    assert model.expert_cache.stats.misses <= 32


def test_bad_budgets_name_the_smallest_that_works(qwen3):
    least = _budget(qwen3, 0.5)  # 2 experts (top-2) in all
    with pytest.raises(ValueError, match=r"is too small: the resident part takes .* the smallest budget that works"):
        moekit.from_pretrained(qwen3, expert_memory=least - 1)
    assert moekit.from_pretrained(qwen3, expert_memory=least).expert_cache.slots == 2
    with pytest.raises(ValueError, match="expert_memory='lots' is invalid"):
        moekit.from_pretrained(qwen3, expert_memory="lots")
    with pytest.raises(ValueError, match="policy='fifo' is invalid"):
        moekit.from_pretrained(qwen3, expert_memory="1GB", expert_policy="fifo")
    with pytest.raises(ValueError, match="save a model loaded without an expert memory budget"):
        moekit.save_pretrained(moekit.from_pretrained(qwen3, expert_memory="1GB"), qwen3.parent / "copy")


def test_a_changed_file_or_expert_fails_clearly_and_nothing_is_written(tmp_path):
    hf_tiny_model("qwen3_moe", tmp_path, mlp_only_layers=[])
    file = tmp_path / "model.safetensors"
    before = (file.read_bytes(), file.stat().st_mtime_ns)
    ids = torch.randint(3, 90, (1, 8), generator=torch.Generator().manual_seed(4))
    model = moekit.from_pretrained(tmp_path, expert_memory=_budget(tmp_path, 2), prefetch=False)
    generate(model, ids, 4)
    assert (file.read_bytes(), file.stat().st_mtime_ns) == before  # the cache never writes the checkpoint
    # the same size and modification time, other bytes: an expert read again fails its checksum
    reader = model.expert_cache.reader
    key = next(k for k in reader._crc)
    run = reader.runs[key[0]][key[1]]
    with open(file, "r+b") as fh:
        fh.seek(run.offset)
        fh.write(bytes(16))
    os.utime(file, ns=(before[1], before[1]))
    with pytest.raises(ExpertReadError, match="reads differently than it did first"):
        for _ in range(50):
            model.expert_cache.reader.read(key[0], model.expert_cache.slot_tensors(0))
    # a file that shrinks under the running model
    with open(file, "r+b") as fh:
        fh.truncate(len(before[0]) - 1000)
    with pytest.raises(ExpertReadError, match="changed under the running model"):
        generate(model, torch.randint(3, 90, (1, 30)), 20)


def test_eviction_policies_on_a_hand_made_history():
    """a used at tokens 0, 1, 2; b at 3; c at 4; victims at token 5. LFU with decay behaves like LFU when uses
    fade slowly (a's score 2.28 against b's 0.87) and like LRU when they fade fast (a's 0.22 against b's 0.25)."""
    made = [Eviction("lru"), Eviction("lfu"), Eviction("lfu-decay", half_life=10.0), Eviction("lfu-decay", 1.0)]
    for policy in made:
        for token, key in enumerate(["a", "a", "a", "b", "c"]):
            policy.use(key, token) if key in policy else policy.add(key, token)
    assert [p.victim(["a", "b", "c"], 5) for p in made] == ["a", "b", "b", "a"]
    assert made[1].victim(["a", "c"], 5) == "c"
    belady = Eviction("belady")
    belady.add("a", 0)
    with pytest.raises(ValueError, match="needs the future"):
        belady.victim(["a"], 0)


def test_generate_command_with_an_expert_budget(tmp_path, capsys):
    hf_tiny_model("qwen3_moe", tmp_path, mlp_only_layers=[], vocab_size=ByteTokenizer.vocab_size)  # bytes as tokens
    budget = str(_budget(tmp_path, 2))
    code = main(["generate", str(tmp_path), "ab", "--max-new-tokens", "6", "--expert-memory", budget, "--json"])
    assert code == 0, capsys.readouterr().err
    out = json.loads(capsys.readouterr().out)
    cache = out["expert_cache"]
    assert cache["slots"] == 8 and cache["misses"] > 0 and 0 < cache["hit_rate"] < 1 and cache["bytes_read"] > 0
    assert main(["generate", str(tmp_path), "ab", "--max-new-tokens", "4", "--expert-memory", budget, "--stats"]) == 0
    assert "MiB read per token, hit rate" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "ab", "--expert-memory", "1KB"]) == 2
    assert "the smallest budget that works is" in capsys.readouterr().err


def test_a_server_beyond_memory_answers_concurrent_requests_as_the_resident_model(tmp_path):
    """moekit serve with an expert budget: four concurrent greedy requests through the openai client, each the
    resident model's own continuation; /metrics shows the cache's reads."""
    openai = pytest.importorskip("openai")
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from serve_fixture import RunningServer, tiny_model_dir

    from moekit.serve.model import serve_directory

    path = tiny_model_dir(tmp_path)
    resident = moekit.from_pretrained(path)
    model = moekit.from_pretrained(path, expert_memory=_budget(path, 2))
    settings = {"max_batch": 4, "context": 128, "max_queue": 64, "prefill_chunk": 16}
    running = RunningServer(serve_directory(model, path, "tiny", **settings))
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)
        prompts = ["abc", "hello there", "x = 1", "moe"]

        def ask(prompt: str) -> str:
            return client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0).choices[0].text

        with ThreadPoolExecutor(4) as pool:
            texts = list(pool.map(ask, prompts))
        tokenizer = running.served.tokenizer
        for prompt, text in zip(prompts, texts, strict=True):
            ids = tokenizer.encode(prompt)
            alone = generate(resident, torch.tensor([ids]), 8)[0, len(ids) :].tolist()
            assert text == tokenizer.decode(alone)
        metrics = httpx.get(f"{running.url}/metrics").text
        assert 'moekit:expert_cache_misses_total{model_name="tiny"}' in metrics
        slots = 2 * len(model.moe_blocks())
        assert f'moekit:expert_cache_slots{{model_name="tiny"}} {slots:.1f}' in metrics
    finally:
        running.stop()


def test_prefetch_auto_pauses_while_the_guesses_are_mostly_wrong(qwen3):
    """prefetch="auto" reads ahead while the recent guesses were at least half right; after a run of wrong ones it
    only guesses (and scores) until they improve."""
    model = moekit.from_pretrained(qwen3, expert_memory=_budget(qwen3, 2), prefetch="auto")
    cache = model.expert_cache
    ids = torch.randint(3, 90, (1, 6), generator=torch.Generator().manual_seed(5))
    cache.recent.extend([(2, 0)] * cache.recent.maxlen)  # a history of wrong guesses
    assert not cache.prefetch_pays()
    generate(model, ids, 4)
    assert cache.stats.prefetched == 0 and cache.stats.predicted > 0  # guessed and scored, nothing read ahead
    cache.recent.extend([(2, 2)] * cache.recent.maxlen)
    generate(model, ids, 4)
    assert cache.stats.prefetched > 0


def test_a_failing_read_is_named(qwen3):
    model = moekit.from_pretrained(qwen3, expert_memory=_budget(qwen3, 2), prefetch=False)
    reader = model.expert_cache.reader
    file = next(iter(reader._fds))
    os.close(reader._fds[file])
    reader._fds[file] = os.open(os.devnull, os.O_WRONLY)  # reads now fail (EBADF) as a failing disk's would
    with pytest.raises(ExpertReadError, match=r"reading expert \d+ of layer \d+ failed"):
        generate(model, torch.randint(3, 90, (1, 4)), 2)


@pytest.mark.parametrize("case", ["gpt_oss-mxfp4", "qwen3_moe-fp8"])
def test_experts_shipped_quantized_are_read_as_stored(case, tmp_path):
    """gpt-oss's MXFP4 experts (stacked blocks and scales) and FP8-block experts (one weight and scale per expert
    and projection) stay quantized in the pool: the resident quantized model's logits and tokens."""
    from test_quant_load import _shipped

    _, directory = _shipped(case, tmp_path)
    ids = torch.randint(3, 90, (1, 8), generator=torch.Generator().manual_seed(6))
    tokens, logits = _resident(directory, ids, 6)
    model = moekit.from_pretrained(directory, expert_memory=_budget(directory, 2))
    pool = model.expert_cache.pool
    assert pool.fmt.name == moekit.from_pretrained(directory).layers[0].mlp.experts.fmt.name
    assert torch.equal(generate(model, ids, 6), tokens)
    with torch.no_grad():
        assert torch.equal(model(tokens), logits)
