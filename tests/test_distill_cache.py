"""KTAP teacher-embedding cache: TTL expiry, misses, eviction, counters; the teacher token."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _distill import TinyNetwork, make_batch, planted_rows, tiny_schema
from lattice.distill import (
    DictEmbeddingStore,
    DistillationModule,
    InProcessEmbeddingStore,
    TeacherEmbeddingCache,
    TeacherTokenProjection,
)

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


def _emb(keys, dim=3):
    return torch.stack([torch.full((dim,), float(k)) for k in keys]) if keys else torch.zeros(0, dim)


@pytest.mark.parametrize("store", ["tensor", "dict"])
def test_ttl_expiry_misses_and_counters(store):
    dim = 3
    backend = InProcessEmbeddingStore(dim, capacity=64) if store == "tensor" else DictEmbeddingStore(dim)
    cache = TeacherEmbeddingCache(dim, ttl=5.0, store=backend)
    cache.update(torch.tensor([10, 11]), _emb([10, 11]), now=0.0)
    cache.update(torch.tensor([12]), _emb([12]), now=3.0)

    emb, hit = cache.lookup(torch.tensor([10, 12, 99]), now=5.0)  # age 5 (== ttl) still fresh
    assert hit.tolist() == [True, True, False]
    assert emb[0].tolist() == [10.0] * 3 and emb[1].tolist() == [12.0] * 3
    assert emb[2].tolist() == [0.0] * 3  # a miss is a zero row
    assert (cache.lookups, cache.hits, cache.misses, cache.expired) == (3, 2, 1, 0)

    emb, hit = cache.lookup(torch.tensor([10, 11, 12]), now=6.0)  # 10, 11 are 6 old: expired
    assert hit.tolist() == [False, False, True]
    assert (emb[:2] == 0).all()
    assert (cache.lookups, cache.hits, cache.misses, cache.expired) == (6, 3, 1, 2)
    assert cache.hit_rate == pytest.approx(0.5)

    cache.update(torch.tensor([10]), _emb([7]), now=6.0)  # a refresh revives the key
    emb, hit = cache.lookup(torch.tensor([10]), now=7.0)
    assert hit.tolist() == [True] and emb[0, 0].item() == 7.0
    cache.reset_counters()
    assert cache.lookups == 0 and math.isnan(cache.hit_rate)


def test_ttl_zero_and_infinite():
    cache = TeacherEmbeddingCache(2, ttl=0.0)
    cache.update(torch.tensor([1]), torch.ones(1, 2), now=4.0)
    assert cache.lookup(torch.tensor([1]), now=4.0)[1].tolist() == [True]
    assert cache.lookup(torch.tensor([1]), now=4.5)[1].tolist() == [False]
    forever = TeacherEmbeddingCache(2)
    forever.update(torch.tensor([1]), torch.ones(1, 2), now=0.0)
    assert forever.lookup(torch.tensor([1]), now=1e12)[1].tolist() == [True]


def test_update_skips_masked_and_non_finite_rows_and_last_duplicate_wins():
    cache = TeacherEmbeddingCache(2, store=InProcessEmbeddingStore(2, capacity=1024))
    keys = torch.tensor([1, 2, 3, 1])
    emb = torch.tensor([[1.0, 1.0], [2.0, float("nan")], [3.0, 3.0], [4.0, 4.0]])
    cache.update(keys, emb, now=0.0, mask=torch.tensor([True, True, False, True]))
    out, hit = cache.lookup(torch.tensor([1, 2, 3]), now=0.0)
    assert hit.tolist() == [True, False, False]  # 2: non-finite, 3: the teacher did not score it
    assert out[0].tolist() == [4.0, 4.0]  # the later duplicate wins


def test_collisions_evict_and_never_return_another_keys_value():
    store = InProcessEmbeddingStore(1, capacity=4)
    keys = torch.arange(100, dtype=torch.long)
    store.put(keys, keys.float().unsqueeze(1), torch.zeros(100, dtype=torch.float64))
    values, _, found = store.get(keys)
    assert 1 <= int(found.sum()) <= 4 and len(store) == int(found.sum())
    assert torch.equal(values[found, 0], keys[found].float())  # whatever survived is its own value
    # every key that did not land was pushed out by a later colliding row of the same put
    assert store.evictions == 100 - len(store)
    store.put(torch.arange(100, 200), torch.zeros(100, 1), torch.zeros(100, dtype=torch.float64))
    assert store.evictions >= 1


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.integers(-2**40, 2**40), min_size=0, max_size=12), min_size=1, max_size=6))
def test_tensor_store_matches_dict_store(ops):
    """With room to spare (no evictions), the tensor table behaves exactly like a dict."""
    tensor, ref = InProcessEmbeddingStore(2, capacity=1 << 12), DictEmbeddingStore(2)
    for step, keys in enumerate(ops):
        k = torch.tensor(keys, dtype=torch.long)
        v = torch.stack([k.double().float(), torch.full((len(keys),), float(step))], 1) if keys else torch.zeros(0, 2)
        t = torch.full((len(keys),), float(step), dtype=torch.float64)
        probe = torch.tensor(keys + [12345678901], dtype=torch.long)
        a, b = tensor.get(probe), ref.get(probe)
        if tensor.evictions == 0:
            assert torch.equal(a[2], b[2]) and torch.equal(a[0], b[0]) and torch.equal(a[1][a[2]], b[1][b[2]])
        tensor.put(k, v, t)
        ref.put(k, v, t)


def test_cache_argument_errors():
    with pytest.raises(ValueError, match="ttl"):
        TeacherEmbeddingCache(2, ttl=-1)
    with pytest.raises(ValueError, match="key"):
        TeacherEmbeddingCache(2, key="item_id")
    with pytest.raises(ValueError, match="width"):
        TeacherEmbeddingCache(2, store=DictEmbeddingStore(3))
    cache = TeacherEmbeddingCache(2)
    with pytest.raises(ValueError, match="embeddings"):
        cache.update(torch.tensor([1]), torch.ones(1, 3), now=0)
    with pytest.raises(ValueError, match="1-D"):
        cache.lookup(torch.ones(2, 2, dtype=torch.long), now=0)


def test_keys_of_batch():
    rows = planted_rows(6)
    batch = make_batch(rows)
    assert torch.equal(TeacherEmbeddingCache(2).keys_of(batch), batch.user_id)
    assert torch.equal(TeacherEmbeddingCache(2, key="example_id").keys_of(batch), batch.example_id)


def test_teacher_token_projection_miss_is_the_learned_missing_token():
    proj = TeacherTokenProjection(4, 6)
    emb = torch.randn(3, 4) * 10
    hit = torch.tensor([True, False, False])
    tok = proj(emb, hit)
    assert tok.shape == (3, 1, 6)
    missing = proj.proj.bias + proj.proj.weight[:, -1]  # zero embedding + mask bit
    assert torch.allclose(tok[1, 0], missing) and torch.allclose(tok[2, 0], missing)
    assert not torch.allclose(tok[0, 0], missing)
    # layer norm: the teacher's scale does not matter
    assert torch.allclose(proj(emb * 7, hit), tok, atol=1e-5)
    # a non-finite embedding on a "hit" row cannot poison the token
    emb[0, 0] = float("nan")
    assert torch.isfinite(proj(emb, hit)).all()


# ---- the teacher token inside the student -----------------------------------------------------------

def _ktap_student(cache=None, dim=5):
    torch.manual_seed(0)
    schema = tiny_schema()
    net = TinyNetwork(schema, extra_tokens=1)
    return DistillationModule(net, distillation="aux_head", teacher_embedding_dim=dim, cache=cache)


def test_student_reads_the_cache_before_writing_the_batch():
    dim = 5
    cache = TeacherEmbeddingCache(dim, ttl=10.0)
    module = _ktap_student(cache, dim)
    rows = planted_rows(16, users=4)
    batch = make_batch(rows)
    batch.teacher_embedding = torch.randn(16, dim)
    batch.teacher_mask = torch.ones(16, dtype=torch.bool)
    batch.teacher_logits = rows["true_logits"]
    out = module(batch)
    assert out.teacher_hit.tolist() == [False] * 16  # first sight of every user: nothing cached yet
    out = module(batch)
    assert out.teacher_hit.all()  # now every user is cached
    assert cache.hits == 16 and cache.misses == 16
    loss = module.training_step(batch, 0)
    loss.backward()
    assert module.teacher_token.proj.weight.grad is not None


def test_student_without_cache_uses_the_batch_embedding_and_mask():
    module = _ktap_student(None, 5)
    rows = planted_rows(4)
    batch = make_batch(rows)
    out = module(batch)  # no teacher embedding at all: every row gets the missing token
    assert out.teacher_hit.tolist() == [False] * 4
    batch.teacher_embedding = torch.randn(4, 5)
    batch.teacher_mask = torch.tensor([True, False, True, True])
    assert module(batch).teacher_hit.tolist() == [True, False, True, True]
    batch.teacher_embedding = torch.randn(4, 3)
    with pytest.raises(ValueError, match="teacher_embedding"):
        module(batch)


def test_cache_requires_the_teacher_token():
    with pytest.raises(ValueError, match="teacher_embedding_dim"):
        DistillationModule(TinyNetwork(tiny_schema()), cache=TeacherEmbeddingCache(4))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 40), min_size=0, max_size=10), min_size=1, max_size=5))
def test_a_batch_write_equals_writing_its_rows_one_by_one(batches):
    """Evictions and contents: a batch colliding with itself counts every key it pushes out, as sequential
    writes would (a small table, so collisions inside one batch are common)."""
    batch, one_by_one = InProcessEmbeddingStore(1, capacity=8), InProcessEmbeddingStore(1, capacity=8)
    for step, keys in enumerate(batches):
        k = torch.tensor(keys, dtype=torch.long)
        v = k.float().unsqueeze(1) + step
        t = torch.full((len(keys),), float(step), dtype=torch.float64)
        batch.put(k, v, t)
        for i in range(len(keys)):
            one_by_one.put(k[i:i + 1], v[i:i + 1], t[i:i + 1])
        assert batch.evictions == one_by_one.evictions
        assert torch.equal(batch.valid, one_by_one.valid) and torch.equal(batch.keys, one_by_one.keys)
        assert torch.equal(batch.values, one_by_one.values)
