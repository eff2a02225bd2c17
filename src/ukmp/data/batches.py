"""Model-ready batches for calibration and recovery: the prefix-LM caption split and the collators.

* :class:`ImageTransform` — images to pixels, in :mod:`ukmp.data.images` (re-exported here).
* :func:`prefix_split` — a caption cleaned by ``blip_caption`` is split at a random word k in [1, floor(n/2)];
  the prefix is the encoder text (after the query tokens), the rest is the target.
* :class:`PrefixLMCollator` — records -> {pixel_values, input_ids, attention_mask, labels, decoder_attention_mask};
  every random choice is a function of (seed, sample index, epoch), so a batch can be rebuilt exactly on resume.
* :class:`DecoderOnlyCollator` — the same split for a decoder-only language model: one sequence
  ``[image tokens] [bos] prefix suffix [eos]`` whose ``labels`` are **aligned with the logits** (``labels[:, t]`` is
  the token position ``t`` predicts): the suffix and ``eos`` are targets, image and prompt positions never are.
  With ``prompt_style: template`` the prompt is the processor's chat template around the image and the prefix
  (:mod:`ukmp.data.prompts`); the image is transformed as the model's :class:`~ukmp.models.BatchLayout` says.
  For a ``native_resolution`` layout (Qwen-VL) each image keeps its aspect ratio (:func:`~ukmp.data.resolution.fit_size`), so its row
  holds its own number of image tokens and the batch pads the pixels (:func:`padded_images`, ``image_sizes``).
* :class:`TextWindowCollator` — token windows of a plain text (``format: text``) with aligned labels: every position
  predicts the next token.
* :func:`make_collator` — the collator for a dataset and a model's :class:`~ukmp.models.BatchLayout`; when the
  layout says ``qformer_text`` (InstructBLIP) both collators add the prompt for the Q-Former
  (``qformer_input_ids`` / ``qformer_attention_mask``, :func:`qformer_inputs`).
* :func:`prefetched` — runs a batch generator ahead in a background thread (image decoding and tokenisation
  overlap the model's work).
"""

from __future__ import annotations

import queue
import random
import threading
from typing import Iterable, Iterator, Sequence, TypeVar

import torch

# the image names live in ukmp.data.images; re-exported here for callers that take them with the collators
from ukmp.data.images import CLIP_MEAN, CLIP_STD, RESIZES, ImageTransform, longest_edge_size  # noqa: F401
from ukmp.data.prompts import PromptIds, prompt_ids  # noqa: F401 (prompt_ids: re-exported for the evaluators)
from ukmp.data.resolution import padded_images
from ukmp.data.textclean import blip_caption


def prefix_split(caption: str, rng: random.Random) -> tuple[str, str]:
    """Split a cleaned caption at a random word index k in [1, max(1, n // 2)]: (prefix, suffix)."""
    words = caption.split()
    if not words:
        return "", ""
    k = rng.randint(1, max(1, len(words) // 2))
    return " ".join(words[:k]), " ".join(words[k:])


def sample_rng(seed: int, index: int, epoch: int = 0, stream: int = 0) -> random.Random:
    """A generator owned by one sample in one epoch (so batches are reproducible in any order)."""
    return random.Random((seed * 1_000_003 + index) * 7919 + epoch * 104729 + stream)


class PrefixLMCollator:
    """Build prefix-LM batches from a dataset with ``records[i].caption`` and ``open_image(i)``."""

    def __init__(self, dataset, processor, image_size: int, max_text_tokens: int = 32, augment: bool = True,
                 seed: int = 42, num_query_tokens: int | None = None, qformer_tokenizer=None):
        self.dataset = dataset
        self.qformer_tokenizer = qformer_tokenizer
        self.tokenizer = processor.tokenizer
        self.image_token = getattr(processor, "image_token", None)
        self.num_query_tokens = num_query_tokens if num_query_tokens is not None else processor.num_query_tokens
        self.transform = ImageTransform(image_size, train=augment)
        self.max_text_tokens = max_text_tokens
        self.seed = seed
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(str(self.image_token))

    def texts(self, index: int, epoch: int = 0) -> tuple[str, str]:
        caption = blip_caption(self.dataset.records[index].caption)
        return prefix_split(caption, sample_rng(self.seed, index, epoch, stream=1))

    def _tokens(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=True, truncation=True, max_length=self.max_text_tokens)
        return list(ids["input_ids"])

    def text_lengths(self, index: int, epoch: int = 0) -> tuple[int, int]:
        """(encoder length incl. the query tokens, decoder length) of sample ``index`` in ``epoch``."""
        prefix, suffix = self.texts(index, epoch)
        return self.num_query_tokens + len(self._tokens(prefix)), len(self._tokens(suffix))

    def __call__(self, indices: Sequence[int], epoch: int = 0) -> dict[str, torch.Tensor]:
        pix, enc, dec = [], [], []
        for i in indices:
            rng = sample_rng(self.seed, int(i), epoch, stream=0)
            pix.append(self.transform(self.dataset.open_image(int(i)), rng))
            prefix, suffix = self.texts(int(i), epoch)
            enc.append([self.image_token_id] * self.num_query_tokens + self._tokens(prefix))
            dec.append(self._tokens(suffix))
        pad = self.tokenizer.pad_token_id
        le, ld = max(map(len, enc)), max(map(len, dec))
        input_ids = torch.full((len(enc), le), pad, dtype=torch.long)
        attention = torch.zeros((len(enc), le), dtype=torch.long)
        labels = torch.full((len(dec), ld), -100, dtype=torch.long)
        dec_mask = torch.zeros((len(dec), ld), dtype=torch.long)
        for r, (e, d) in enumerate(zip(enc, dec)):
            input_ids[r, : len(e)] = torch.tensor(e)
            attention[r, : len(e)] = 1
            labels[r, : len(d)] = torch.tensor(d)
            dec_mask[r, : len(d)] = 1
        return {"pixel_values": torch.stack(pix), "input_ids": input_ids, "attention_mask": attention,
                "labels": labels, "decoder_attention_mask": dec_mask, **self._qformer(indices, epoch)}

    def _qformer(self, indices: Sequence[int], epoch: int) -> dict[str, torch.Tensor]:
        """InstructBLIP: the prompt (the caption prefix) for the Q-Former too; nothing for other models."""
        if self.qformer_tokenizer is None:
            return {}
        return qformer_inputs(self.qformer_tokenizer, [self.texts(int(i), epoch)[0] for i in indices],
                              self.max_text_tokens)


def qformer_inputs(tokenizer, prompts: Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
    """``qformer_input_ids`` / ``qformer_attention_mask`` (right-padded, the tokenizer's special tokens) as
    ``InstructBlipProcessor`` builds them from the prompts."""
    rows = [list(tokenizer(p, add_special_tokens=True, truncation=max_length is not None,
                           max_length=max_length)["input_ids"]) for p in prompts]
    length = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), length), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[r, : len(row)] = 1
    return {"qformer_input_ids": ids, "qformer_attention_mask": mask}


class DecoderOnlyCollator(PrefixLMCollator):
    """Prefix-LM batches for a decoder-only language model: ``{[pixel_values], input_ids, attention_mask, labels}``,
    right-padded, ``labels`` aligned with the logits (see the module docstring). The prefix/suffix split is
    :class:`PrefixLMCollator`'s; the prefix is the prompt, written with its image in ``prompt_style``
    (:class:`ukmp.data.prompts.PromptIds`: plain ``[image tokens] [bos] prefix``, or the processor's chat template
    around a user turn holding the image and the prefix), and the suffix with ``eos`` follows as the target. A
    plain causal LM's layout has no image: neither pixels nor image tokens."""

    def __init__(self, dataset, processor, layout, image_size: int | None = None, max_text_tokens: int = 32,
                 augment: bool = True, seed: int = 42, qformer_tokenizer=None, prompt_style: str = "plain"):
        self.dataset = dataset
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.qformer_tokenizer = qformer_tokenizer
        self.prompt = PromptIds(processor, layout, prompt_style, max_text_tokens)
        self.transform = (ImageTransform.for_layout(layout, image_size, train=augment, native=True)
                          if layout.has_images else None)
        self.native_unit = self.transform.fit_unit if self.transform is not None else 0
        self.max_text_tokens = max_text_tokens
        self.seed = seed
        self.eos = self.tokenizer.eos_token_id

    def _target(self, text: str) -> list[int]:
        ids = list(self.tokenizer(" " + text if text else "", add_special_tokens=False)["input_ids"])
        return ids[: self.max_text_tokens - 1] + [self.eos]

    def _image_tokens(self, image: torch.Tensor | None) -> int | None:
        """The image tokens of ``image`` under a ``native_resolution`` layout (one per ``native_unit^2`` pixels);
        ``None``: the layout's fixed count."""
        if image is None or not self.native_unit:
            return None
        return image.shape[1] * image.shape[2] // self.native_unit ** 2

    def text_lengths(self, index: int, epoch: int = 0) -> tuple[int, int]:
        prefix, suffix = self.texts(index, epoch)
        n_img = None
        if self.native_unit:  # the uncropped image's count (the size alone is read)
            w, h = self.transform.out_size(*self.dataset.open_image(index).size)
            n_img = w * h // self.native_unit ** 2
        return len(self.prompt(prefix, n_img)), len(self._target(suffix))

    def __call__(self, indices: Sequence[int], epoch: int = 0) -> dict[str, torch.Tensor]:
        pix, rows, spans = [], [], []
        for i in indices:
            image = None
            if self.transform is not None:
                rng = sample_rng(self.seed, int(i), epoch, stream=0)
                image = self.transform(self.dataset.open_image(int(i)), rng)
                pix.append(image)
            prefix, suffix = self.texts(int(i), epoch)
            head = self.prompt(prefix, self._image_tokens(image))
            tail = self._target(suffix)
            rows.append(head + tail)
            spans.append((len(head), len(head) + len(tail)))
        batch = {**aligned_batch(rows, spans, self.tokenizer.pad_token_id), **self._qformer(indices, epoch)}
        if pix and self.native_unit:
            batch = {**padded_images(pix), **batch}
        elif pix:
            batch = {"pixel_values": torch.stack(pix), **batch}
        return batch


def aligned_batch(rows: Sequence[list[int]], spans: Sequence[tuple[int, int]], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` and labels aligned with the logits: for each row, positions
    ``t`` with ``start <= t + 1 < end`` get ``labels[t] = ids[t + 1]``; every other position is -100."""
    length = max(map(len, rows))
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for r, (ids, (start, end)) in enumerate(zip(rows, spans)):
        t = torch.tensor(ids, dtype=torch.long)
        input_ids[r, : len(ids)] = t
        attention[r, : len(ids)] = 1
        first = max(start - 1, 0)
        labels[r, first: end - 1] = t[first + 1: end]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


class TextWindowCollator:
    """Batches of token windows of a :class:`~ukmp.data.records.TextDataset`: every position predicts the next
    token (labels aligned with the logits). Sample ``i`` is window ``i``; there is no randomness."""

    def __init__(self, dataset, tokenizer, bos: bool = False):
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.windows = dataset.windows(tokenizer)
        self.bos = [tokenizer.bos_token_id] if bos and tokenizer.bos_token_id is not None else []
        self.records = [f"window:{start}" for start, _ in self.windows]  # sample ids

    def __len__(self) -> int:
        return len(self.windows)

    def text_lengths(self, index: int, epoch: int = 0) -> tuple[int, int]:
        n = len(self.windows[index][1])
        return len(self.bos), n

    def __call__(self, indices: Sequence[int], epoch: int = 0) -> dict[str, torch.Tensor]:
        rows = [self.bos + self.windows[int(i)][1] for i in indices]
        spans = [(len(self.bos) + 1, len(r)) for r in rows]  # a window's first token is context, not a target
        return aligned_batch(rows, spans, self.tokenizer.pad_token_id or 0)


def make_collator(dataset, processor, layout, image_size: int | None = None, max_text_tokens: int = 32,
                  augment: bool = True, seed: int = 42, prompt_style: str = "plain"):
    """The batch builder for ``dataset`` and a model's :class:`~ukmp.models.BatchLayout` (``processor``: a
    processor with a ``tokenizer``, or a tokenizer). ``image_size`` overrides the model's. ``prompt_style``: as
    resolved for the dataset and model (:func:`ukmp.data.prompts.dataset_style`); plain text never has one."""
    from ukmp.data.records import TextDataset

    tokenizer = getattr(processor, "tokenizer", processor)
    if isinstance(dataset, TextDataset):
        if not layout.decoder_only:
            raise ValueError(f"dataset {dataset.name!r}: plain text needs a decoder-only language model")
        return TextWindowCollator(dataset, tokenizer)
    if layout.fixed_image_size and image_size and image_size != layout.image_size:
        raise ValueError(f"data.image_size: {image_size} differs from the model's {layout.image_size}, which fixes "
                         f"the number of image tokens ({layout.image_tokens}); leave it 0")
    size = (image_size or layout.image_size) if layout.has_images else None
    qformer_tok = getattr(processor, "qformer_tokenizer", None) if layout.qformer_text else None
    if layout.qformer_text and qformer_tok is None:
        raise ValueError(f"processor: {type(processor).__name__} has no qformer_tokenizer, which the model's "
                         f"Q-Former needs for the prompt (an InstructBlipProcessor has one)")
    if layout.decoder_only:
        return DecoderOnlyCollator(dataset, processor, layout, size, max_text_tokens, augment, seed,
                                   qformer_tokenizer=qformer_tok, prompt_style=prompt_style)
    if prompt_style != "plain":
        raise ValueError(f"dataset {dataset.name!r}: prompt_style {prompt_style!r} needs a decoder-only language "
                         f"model (an encoder-decoder reads a plain prompt)")
    return PrefixLMCollator(dataset, processor, size, max_text_tokens, augment, seed,
                            num_query_tokens=layout.image_tokens, qformer_tokenizer=qformer_tok)


def dataset_size(dataset, collate) -> int:
    """Number of samples a collator can build (text datasets: windows; others: records)."""
    return len(collate) if hasattr(collate, "__len__") else len(dataset)


def length_grouped(indices: Sequence[int], lengths: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """``indices`` cut into batches of neighbours in (decoder, encoder) length order, so each batch pads little.

    For passes whose result is a sum over samples (calibration), where the batch composition does not matter.
    Ties keep the given order (a stable sort), so the grouping is deterministic."""
    order = sorted(range(len(indices)), key=lambda i: (lengths[i][1], lengths[i][0]))
    ranked = [indices[i] for i in order]
    return [ranked[i: i + batch_size] for i in range(0, len(ranked), batch_size)]


def calibration_chunks(indices: Sequence[int], batch_size: int, collate: "PrefixLMCollator", epoch: int,
                       by_length: bool) -> list[list[int]]:
    """``indices`` cut into calibration batches: grouped by this epoch's text lengths (:func:`length_grouped`;
    the prefix split, and so each length, changes with the epoch) or consecutive."""
    if by_length:
        return length_grouped(indices, [collate.text_lengths(i, epoch) for i in indices], batch_size)
    return [list(indices[i: i + batch_size]) for i in range(0, len(indices), batch_size)]


def index_batches(n: int, batch_size: int, seed: int | None = None, epoch: int = 0) -> list[list[int]]:
    """Sample indices 0..n-1 (shuffled with (seed, epoch) when a seed is given) cut into batches."""
    order = list(range(n))
    if seed is not None:
        random.Random(seed * 31 + epoch).shuffle(order)
    return [order[i: i + batch_size] for i in range(0, n, batch_size)]


T = TypeVar("T")


class _End:
    def __init__(self, error: BaseException | None = None):
        self.error = error


def prefetched(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """The items of ``items`` in order, produced by a background thread up to ``depth`` items ahead.

    Collating a batch (opening and resizing images, tokenising) releases the GIL for most of its time, so it
    overlaps the model's forward and backward. An exception in the producer is raised here, at the item where it
    happened; closing this generator early stops the producer after the item it is building. ``depth <= 0``
    iterates inline. The collators draw their randomness per (seed, sample, epoch), so the batches are the same
    either way."""
    if depth <= 0:
        yield from items
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for x in items:
                if not put(x):
                    return
            put(_End())
        except BaseException as e:  # handed to the consumer
            put(_End(e))

    worker = threading.Thread(target=produce, name="ukmp-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            x = q.get()
            if isinstance(x, _End):
                if x.error is not None:
                    raise x.error
                return
            yield x
    finally:
        stop.set()
        worker.join(timeout=5.0)
