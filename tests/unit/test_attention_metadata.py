"""AttentionMetadata.build and the reference backend's padded plan against a plain per-token construction, for decode
steps and mixed batches."""

import random

import pytest
import torch

from glmserve.layers.attention import AttentionMetadata
from glmserve.layers.attention.reference import TorchNativeBackend


def _reference(starts, query_lens, tables, block_size):
    batch, max_q = len(starts), max(query_lens)
    max_kv = max(s + q for s, q in zip(starts, query_lens))
    padded = [t + [0] * (max_kv // block_size + 1) for t in tables]  # past a table's end: block 0
    kv_slots = [[padded[b][k // block_size] * block_size + k % block_size for k in range(max_kv)]
                for b in range(batch)]
    slot_mapping, query_index, query_unpad, mask = [], [[0] * max_q for _ in range(batch)], [], []
    for b in range(batch):
        rows = []
        for j in range(max_q):
            real = j < query_lens[b]
            position = starts[b] + j if real else 0  # padding rows see key 0 only
            if real:
                query_index[b][j] = len(slot_mapping)
                query_unpad.append(b * max_q + j)
                slot_mapping.append(kv_slots[b][position])
            rows.append([k <= position for k in range(max_kv)])
        mask.append([rows])
    if all(q == max_q for q in query_lens):  # no padding: the query rows need no gather
        query_index = query_unpad = None
    return {"slot_mapping": slot_mapping, "max_query_len": max_q, "query_index": query_index,
            "query_unpad": query_unpad, "kv_slots": kv_slots, "mask": mask}


@pytest.mark.parametrize("seed", range(40))
def test_build_matches_a_per_token_reference(seed):
    rng = random.Random(seed)
    batch = rng.randint(1, 5)
    starts = [rng.randint(0, 50) for _ in range(batch)]
    decode = seed % 2 == 0
    if decode:  # one query each, or (verification) as many each
        query_lens = [rng.choice((1, 1, 2, 4))] * batch
    else:
        query_lens = [rng.choice((1, 2, 4, rng.randint(1, 30))) for _ in range(batch)]
    tables = [rng.sample(range(100), -(-(s + q) // 4) + rng.randint(0, 2)) for s, q in zip(starts, query_lens)]
    meta = AttentionMetadata.build(starts, query_lens, tables, 4, torch.device("cpu"), TorchNativeBackend())
    assert meta.query_start_loc == [sum(query_lens[:b]) for b in range(batch + 1)]
    assert meta.seq_lens == [s + q for s, q in zip(starts, query_lens)]
    for field, expected in _reference(starts, query_lens, tables, 4).items():
        got = getattr(meta if field == "slot_mapping" else meta.plan, field)
        assert (got.tolist() if isinstance(got, torch.Tensor) else got) == expected, field
