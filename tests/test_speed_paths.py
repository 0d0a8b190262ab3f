"""The fast paths give what the plain ones give: batched generation row by row equals one-row generation (with
end-of-text and both position kinds), sampling equals a plain recompute-everything loop, the KV cache's views
are the slices it stores."""

from pathlib import Path

import pytest
import torch

from attention import KVCache
from gpt import GPT, GPTConfig, sample_next

REPO = Path(__file__).resolve().parent.parent


def tiny(**kw) -> GPT:
    """float64, so that a batch's matmuls (another kernel than one row's) cannot round a near-tie differently.
    An untied head: with a tied one, an untrained model's greedy text repeats one token."""
    torch.manual_seed(0)
    config = dict(vocab_size=50, block_size=16, embedding_dim=32, num_of_layers=2, num_of_heads=2, dropout=0.0,
                  tie_embeddings=False)
    return GPT(GPTConfig(**{**config, **kw})).double().eval()


@pytest.mark.parametrize("position", ["learned", "rope"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_row_i_of_a_batched_greedy_run_equals_that_prompt_run_alone(position, use_cache):
    model = tiny(position=position)
    prompts = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(1))
    batched = model.generate(prompts, 40, temperature=0, use_cache=use_cache)  # 45 tokens: past block_size 16
    alone = torch.cat([model.generate(prompts[i:i + 1], 40, temperature=0, use_cache=use_cache) for i in range(3)])
    assert torch.equal(batched, alone)
    assert len({tuple(row) for row in batched[:, 5:].tolist()}) > 1  # the rows really are different texts


def test_batched_rows_stop_at_their_own_end_of_text():
    """Each row equals its run alone: its free text up to its eos, then eos again and again. The batch stops
    once every row is done."""
    model = tiny()
    prompts = torch.randint(0, 50, (3, 4), generator=torch.Generator().manual_seed(9))
    free = model.generate(prompts, 30, temperature=0)[:, 4:]
    eos = int(free[0, 3])
    firsts = [row.index(eos) if eos in row else None for row in free.tolist()]
    assert firsts == [3, None, 22]  # (for these prompts) one row ends early, one late, one never
    out = model.generate(prompts, 30, temperature=0, eos_id=eos)[:, 4:]
    assert out.size(1) == 30  # row 1 never ends
    for i, first in enumerate(firsts):
        alone = model.generate(prompts[i:i + 1], 30, temperature=0, eos_id=eos)[0, 4:]
        assert torch.equal(out[i, :alone.size(0)], alone)
        if first is not None:
            assert alone.size(0) == first + 1 and torch.equal(alone, free[i, :first + 1])
            assert (out[i, first:] == eos).all()
    both_end = model.generate(prompts[[0, 2]], 30, temperature=0, eos_id=eos)[:, 4:]
    assert torch.equal(both_end, out[[0, 2], :23])  # stopped right after the later one's eos


def test_sampling_equals_a_plain_loop_that_recomputes_everything():
    """Within block_size, the cached sampler draws the same tokens as the simplest loop with the same generator."""
    model = tiny()
    prompt = torch.randint(0, 50, (2, 3), generator=torch.Generator().manual_seed(3))
    fast = model.generate(prompt, 12, temperature=0.9, top_k=20, generator=torch.Generator().manual_seed(4))
    idx, generator = prompt, torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _ in range(12):
            logits, _ = model(idx)
            next_id = sample_next(logits[:, -1], 0.9, 20, None, generator)
            idx = torch.cat([idx, next_id[:, None]], dim=1)
    assert torch.equal(fast, idx)


def test_generate_keeps_the_prompt_and_a_longer_than_block_prompt_works():
    model = tiny()
    prompt = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(5))  # > block_size 16
    out = model.generate(prompt, 7, temperature=0)
    assert out.shape == (2, 27) and torch.equal(out[:, :20], prompt)
    assert torch.equal(out, model.generate(prompt, 7, temperature=0, use_cache=False))


def test_the_kv_cache_returns_views_of_what_it_stored():
    cache = KVCache(2, 3, 8, 4, torch.device("cpu"), torch.float32)
    first, second = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 1, 4)
    cache.append(first, -first)
    k, v = cache.append(second, -second)
    assert cache.length == 6 and torch.equal(k, torch.cat([first, second], dim=2)) and torch.equal(v, -k)
    assert k.data_ptr() == cache.k.data_ptr()  # a view into the preallocated buffer, not a copy
