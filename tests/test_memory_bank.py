"""Per-class memory bank: DiscoBox ObjectQueues golden, FIFO behaviour, size filter, bounded memory, sampling."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from teacher.config import BankConfig
from teacher.memory_bank import MemoryBank
from goldens import golden_tensors





def test_official_bank_and_retrieval_match_discobox():
    z = golden_tensors("discobox_objbank")
    meta = z["meta"]
    cfg = BankConfig(
        capacity=meta["len_queue"], max_partners=meta["max_retrieval_objs"], min_partners=5, min_box_side=0.0,
        mode="official", fg_iou_thresh=meta["fg_iou_thresh"], bg_iou_thresh=meta["bg_iou_thresh"],
        appear_thresh=meta["appear_thresh"], ratio_min=meta["ratio_range"][0], ratio_max=meta["ratio_range"][1],
    )
    bank = MemoryBank(cfg)
    cls = meta["category"]
    for i in range(meta["n_appended"]):
        assert bank.push(cls, z["obj_feature"][i], z["obj_mask"][i], z["obj_box"][i], f"img{i}", i)
    queue = bank.queues[cls]
    assert torch.equal(queue.feature, z["bank_feature"])
    assert torch.equal(queue.mask, z["bank_mask"])
    assert torch.equal(queue.box, z["bank_box"])
    assert queue.ptr == int(z["bank_ptr"])
    assert queue.instance_id.tolist() == z["slot_source_obj"].tolist()
    assert len(bank) == meta["len_queue"] and bank.fill() == {cls: meta["len_queue"]}

    query = (z["query_feature_in"][0], z["query_mask"][0], z["query_box"][0])
    scores = bank.official_scores(cls, *query, slots=list(range(meta["len_queue"])))
    for key in ("fg_ious", "bg_ious", "appear_sim", "ratio"):
        torch.testing.assert_close(scores[key], z[key], rtol=1e-5, atol=1e-6, msg=key)
    partners = bank.retrieve(cls, *query)
    assert [p.slot for p in partners] == z["retrieved_slots"].tolist()
    assert [p.instance_id for p in partners] == z["slot_source_obj"][z["retrieved_slots"]].tolist()
    assert torch.equal(partners[0].feature, z["bank_feature"][0])

    # Excluding slot 0's image lets slot 8 (cut off above) in; with a minimum of 8 the 7 that pass give nothing.
    assert [p.slot for p in bank.retrieve(cls, *query, exclude_image_id="img10")] == [2, 4, 5, 7, 8]
    strict = MemoryBank(dataclasses.replace(cfg, max_partners=10, min_partners=8))
    for i in range(meta["n_appended"]):
        strict.push(cls, z["obj_feature"][i], z["obj_mask"][i], z["obj_box"][i], f"img{i}", i)
    assert strict.retrieve(cls, *query) == []
    assert len(MemoryBank(dataclasses.replace(cfg, max_partners=10)).retrieve(cls, *query)) == 0   # empty bank


def _obj(i: int, c: int = 4, g: int = 3, r: int = 6):
    return torch.full((c, g, g), float(i)), torch.full((r, r), i / 100.0), torch.tensor([0.0, 0.0, 40.0, 50.0])


def test_fifo_overwrites_the_oldest_slot():
    bank = MemoryBank(BankConfig(capacity=3))
    for i in range(5):
        feat, mask, box = _obj(i)
        assert bank.push(7, feat, mask, box, f"im{i}", i)
    queue = bank.queues[7]
    assert queue.instance_id.tolist() == [3, 4, 2]
    assert queue.image_id == ["im3", "im4", "im2"]
    assert queue.feature[:, 0, 0, 0].tolist() == [3.0, 4.0, 2.0]
    assert queue.ptr == 2 and queue.count == 3 and len(bank) == 3


def test_only_boxes_with_both_sides_at_least_min_side_are_pushed():
    bank = MemoryBank(BankConfig(min_box_side=32.0))
    feat, mask, _ = _obj(0)
    assert not bank.push(1, feat, mask, [10, 10, 41.9, 100], "a", 0)       # 31.9 wide
    assert not bank.push(1, feat, mask, [10, 10, 100, 41], "a", 1)         # 31 tall
    assert len(bank) == 0 and bank.fill() == {}
    assert bank.push(1, feat, mask, [10, 10, 42, 42], "a", 2)              # exactly 32 x 32
    assert bank.fill() == {1: 1}


def test_memory_stays_bounded_whatever_is_pushed():
    bank = MemoryBank(BankConfig(capacity=10))
    feat, mask, box = _obj(0)
    bank.push(0, feat, mask, box, "first", 0)
    queue = bank.queues[0]
    pointers = (queue.feature.data_ptr(), queue.mask.data_ptr(), queue.box.data_ptr(), queue.instance_id.data_ptr())
    for i in range(1, 2000):
        bank.push(0, feat + i, mask, box, f"im{i}", i)
    assert (queue.feature.data_ptr(), queue.mask.data_ptr(), queue.box.data_ptr(),
            queue.instance_id.data_ptr()) == pointers
    assert queue.feature.shape[0] == 10 and len(queue.image_id) == 10 and len(bank) == 10
    assert sorted(queue.instance_id.tolist()) == list(range(1990, 2000))


def _filled(seed: int, n: int, capacity: int = 100) -> MemoryBank:
    bank = MemoryBank(BankConfig(capacity=capacity, seed=seed))
    for i in range(n):
        feat, mask, box = _obj(i)
        bank.push(3, feat, mask, box, f"im{i // 2}", i)     # two objects per image
    return bank


def test_random_retrieval_is_seeded_bounded_and_excludes_the_query_image():
    feat, mask, box = _obj(0)
    picks = [[p.instance_id for p in _filled(seed=11, n=40).retrieve(3, feat, mask, box, "im0")] for _ in range(2)]
    assert picks[0] == picks[1]
    assert len(picks[0]) == 10 and len(set(picks[0])) == 10
    assert not {0, 1} & set(picks[0])
    other = [p.instance_id for p in _filled(seed=12, n=40).retrieve(3, feat, mask, box, "im0")]
    assert other != picks[0]
    # Successive queries draw fresh samples, covering the bank.
    bank = _filled(seed=11, n=40)
    seen = {p.instance_id for _ in range(30) for p in bank.retrieve(3, feat, mask, box)}
    assert seen == set(range(40))


def test_fewer_than_min_partners_gives_none():
    feat, mask, box = _obj(0)
    assert _filled(0, 4).retrieve(3, feat, mask, box) == []
    assert len(_filled(0, 5).retrieve(3, feat, mask, box)) == 5
    assert _filled(0, 6).retrieve(3, feat, mask, box, exclude_image_id="im0") == []   # 6 - 2 own = 4
    assert MemoryBank(BankConfig()).retrieve(3, feat, mask, box) == []               # unknown class


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="mode"):
        MemoryBank(BankConfig(mode="nearest"))
    bank = MemoryBank(BankConfig())
    feat, mask, box = _obj(0)
    bank.push(0, feat, mask, box, "a", 0)
    with pytest.raises(ValueError, match="class 0 stores"):
        bank.push(0, feat[:2], mask, box, "a", 1)
    with pytest.raises(ValueError, match="box"):
        bank.push(0, feat, mask, [0, 0, 40], "a", 1)
    with pytest.raises(ValueError, match="feature"):
        bank.push(0, feat[0], mask, box, "a", 1)
    official = MemoryBank(BankConfig(mode="official", min_partners=1))
    official.push(0, feat, mask, box, "a", 0)
    with pytest.raises(ValueError, match="do not match the stored"):
        official.retrieve(0, feat, mask[:4, :4], box)
