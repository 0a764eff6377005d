"""spillway.integrations.transformers against the real transformers (the pinned release), on the
CPU: greedy `generate()` of a tiny random Llama (built from a config, nothing downloaded) with
`SpillwayCache` gives exactly the tokens of the plain `DynamicCache`: on a real lease from a real
agent (simulated GPUs: the slots are the lease's simulated-cpu arena), through a revocation in
the middle of decoding, and on host memory."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StoppingCriteria, StoppingCriteriaList

from spillway.client import HostMemory, OutOfPeerMemory, PeerMemory
from spillway.integrations.transformers import SpillwayCache, SpillwayLayer
from spillway.testing.agentproc import AgentProcess
from tests.test_client_lease import acquire_env, call, wait_for

PROMPT, NEW = 40, 24


def tiny_llama(seed: int = 0, layers: int = 3) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def prompt(batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 256, (batch, PROMPT), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def generate(model: LlamaForCausalLM, cache: Any, **kw: Any) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(**prompt(), max_new_tokens=NEW, do_sample=False, past_key_values=cache, **kw)
    return out[:, PROMPT:]


def test_greedy_generate_on_a_lease_gives_the_tokens_of_the_plain_cache(agent: AgentProcess) -> None:
    model = tiny_llama()
    reference = generate(model, DynamicCache(config=model.config))
    env, _ = acquire_env(agent, size="16Mi")
    with PeerMemory.from_env(env) as memory:
        cache = SpillwayCache(memory, model.config, chunk_tokens=8)
        got = generate(model, cache)
        assert torch.equal(got, reference)
        assert cache.slots is not None and cache.slots.kind == "simulated-cpu"
        # every layer's KV is in the lease, none on the device
        assert cache.get_seq_length() == PROMPT + NEW - 1
        layers = [x for x in cache.layers if isinstance(x, SpillwayLayer)]
        assert len(layers) == 3 and all(x.keys is None for x in layers)
        used = cache.slots.num_slots - cache.slots.free_slots
        rows = 2 * 2 * 2  # K and V, batch 2, 2 KV heads
        assert used == 3 * rows * 8  # 63 tokens in chunks of 8 (the last token is never cached)
        cache.close()
        assert memory.stats().peer_used_bytes == 0  # the slots went back to the lease


def test_a_revocation_in_the_middle_of_decoding_changes_no_token(agent: AgentProcess) -> None:
    model = tiny_llama(seed=2)
    reference = generate(model, DynamicCache(config=model.config))
    env, gpu = acquire_env(agent, size="16Mi")
    memory = PeerMemory.from_env(env)
    cache = SpillwayCache(memory, model.config, chunk_tokens=8)
    kinds: list[str] = []

    class RevokeAtStep(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kw: Any) -> torch.BoolTensor:
            assert cache.slots is not None
            kinds.append(cache.slots.kind)
            if input_ids.shape[1] == PROMPT + 8:  # the lender wants its memory back, mid-decode
                resp = call(agent, lambda c: c.reclaim(gpu, "16Mi", reason="lender needs it", deadline_s=4.0))
                assert [x.id for x in resp.revoking] == [env["SPILLWAY_LEASE_ID"]]
                wait_for(lambda: cache.slots is not None and cache.slots.generation == 1, 10, "slots to move")
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    try:
        got = generate(model, cache, stopping_criteria=StoppingCriteriaList([RevokeAtStep()]))
        assert torch.equal(got, reference)
        assert "simulated-cpu" in kinds and kinds[-1] == "host-pageable"  # decoding went on in host memory
        rec = wait_for(lambda: memory.revocation if memory.revocation and memory.revocation.released_at else None,
                       10, "the lease to be given back")
        assert rec.on_time and not rec.error
    finally:
        memory.close()


def test_host_memory_and_clear_refusals() -> None:
    model = tiny_llama(seed=3, layers=2)
    reference = generate(model, DynamicCache(config=model.config))
    cache = SpillwayCache(HostMemory(), model.config, chunk_tokens=16, max_tokens=PROMPT + NEW)
    assert torch.equal(generate(model, cache), reference)
    with pytest.raises(ValueError, match="give max_tokens"):
        SpillwayCache(HostMemory(), model.config)
    with pytest.raises(ValueError, match="config"):
        SpillwayCache(HostMemory(), max_tokens=8)
    sliding = LlamaConfig(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], sliding_window=8)
    with pytest.raises(ValueError, match=r"full-attention layers only; this model has \['full_attention', 'sliding"):
        SpillwayCache(HostMemory(), sliding, max_tokens=8)


def test_a_lease_too_small_for_the_context_says_so(agent: AgentProcess) -> None:
    model = tiny_llama(seed=4)
    env, _ = acquire_env(agent, size="1Mi")
    with PeerMemory.from_env(env) as memory:
        # a slot is a quarter of the lease (16 float32 values a token): 4 slots, where a chunk needs 8 rows
        chunk = memory.stats().leased_bytes // (16 * 4) // 4
        cache = SpillwayCache(memory, model.config, chunk_tokens=chunk)
        with pytest.raises(OutOfPeerMemory, match="8 slots asked, 4 of 4 free"):
            generate(model, cache)
