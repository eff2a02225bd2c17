import random

import numpy as np
import pytest
import torch
from PIL import Image

from ukmp.data.batches import PrefixLMCollator, prefix_split
from ukmp.data.images import ImageTransform


def test_prefix_split_range_and_determinism():
    caption = "a red circle on a blue background in a photo"
    n = len(caption.split())
    ks = set()
    for seed in range(200):
        prefix, suffix = prefix_split(caption, random.Random(seed))
        k = len(prefix.split())
        assert 1 <= k <= n // 2
        assert f"{prefix} {suffix}" == caption
        ks.add(k)
    assert ks == set(range(1, n // 2 + 1))  # every allowed split point occurs
    assert prefix_split("one", random.Random(0)) == ("one", "")


def test_image_transform_eval_and_train():
    arr = np.zeros((40, 60, 3), dtype=np.uint8)
    arr[:, :30] = 255
    img = Image.fromarray(arr)
    ev = ImageTransform(16, train=False)(img)
    assert ev.shape == (3, 16, 16)
    # white pixels map to (1 - mean) / std under CLIP normalisation; tolerance covers bicubic overshoot only
    assert abs(ev[0, 8, 0].item() - (1 - 0.48145466) / 0.26862954) < 0.05
    tr = ImageTransform(16, train=True)
    a = tr(img, random.Random(3))
    b = tr(img, random.Random(3))
    c = tr(img, random.Random(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    for s in range(50):  # the crop keeps between half and all of the area (up to rounding)
        left, top, right, bottom = tr.crop_box(60, 40, random.Random(s))
        area = (right - left) * (bottom - top) / (60 * 40)
        assert 0.45 <= area <= 1.0


def test_collator_builds_prefix_lm_batches(tmp_path, tiny):
    from ukmp.data.loaders import load_dataset
    from ukmp.data.sample import write_sample_data

    model, processor = tiny
    paths = write_sample_data(tmp_path)
    ds = load_dataset(paths["cc595k"])
    col = PrefixLMCollator(ds, processor, 32, max_text_tokens=32, augment=True, seed=1,
                           num_query_tokens=model.config.num_query_tokens)
    batch = col([0, 1, 2])
    nq = model.config.num_query_tokens
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert (batch["input_ids"][:, :nq] == model.config.image_token_index).all()
    for r in range(3):
        n_enc = int(batch["attention_mask"][r].sum())
        assert batch["input_ids"][r, n_enc - 1].item() == processor.tokenizer.eos_token_id
        n_dec = int(batch["decoder_attention_mask"][r].sum())
        assert batch["labels"][r, n_dec - 1].item() == processor.tokenizer.eos_token_id
        assert (batch["labels"][r, n_dec:] == -100).all()
    again = col([0, 1, 2])
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    other_epoch = col([0, 1, 2], epoch=1)
    assert not torch.equal(batch["pixel_values"], other_epoch["pixel_values"])
    out = model(**batch)
    assert torch.isfinite(out.loss)
    with pytest.raises((FileNotFoundError, ValueError)):
        (tmp_path / "images" / ds.records[0].image).unlink()
        col([0])


def test_length_grouped_batches():
    from ukmp.data.batches import length_grouped

    idx = [10, 11, 12, 13, 14, 15, 16]
    lengths = [(40, 9), (35, 2), (40, 9), (33, 5), (41, 2), (36, 9), (34, 5)]
    got = length_grouped(idx, lengths, 3)
    assert got == [[11, 14, 13], [16, 15, 10], [12]]  # decoder length first, then encoder; stable ties
    assert sorted(i for b in got for i in b) == idx
    assert length_grouped(idx, lengths, 3) == got  # deterministic

    def padding(batches):
        ln = dict(zip(idx, lengths))
        return sum(max(ln[i][1] for i in b) * len(b) - sum(ln[i][1] for i in b) for b in batches)

    arrival = [idx[i: i + 3] for i in range(0, len(idx), 3)]
    assert padding(got) < padding(arrival)  # 4 vs 18 padded decoder positions


def test_prefetched_keeps_order_errors_and_early_close():
    import threading
    import time

    from ukmp.data.batches import prefetched

    assert list(prefetched(iter(range(20)), depth=3)) == list(range(20))
    assert list(prefetched(iter(range(5)), depth=0)) == list(range(5))  # inline
    main = threading.get_ident()
    seen = []

    def gen():
        for i in range(4):
            seen.append(threading.get_ident())
            yield i

    assert list(prefetched(gen(), depth=2)) == [0, 1, 2, 3]
    assert seen and all(t != main for t in seen)  # not vacuous: produced off the main thread

    def failing():
        yield 1
        raise ValueError("image 7: cannot identify image file")

    it = prefetched(failing(), depth=2)
    assert next(it) == 1
    with pytest.raises(ValueError, match="image 7"):
        next(it)

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    it = prefetched(endless(), depth=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()  # stops the producer: at most depth + 2 items beyond those taken are ever built
    time.sleep(0.2)
    n = len(produced)
    time.sleep(0.2)
    assert len(produced) == n <= 3 + 2 + 2

