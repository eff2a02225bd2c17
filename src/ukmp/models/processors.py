"""Tokenizers and processors for random-weights builds (tests, the demo, the testbeds): a T5 tokenizer trained
offline (no sentencepiece) and the BLIP-2 / InstructBLIP / LLaVA processors around it. The adapters' own
``build_processor`` call these; :mod:`ukmp.models.build` re-exports them."""

from __future__ import annotations

import json
from typing import Iterable

from transformers import Blip2Processor

try:  # transformers >= 5 ships a PIL backend; the default one needs torchvision, which this project avoids
    from transformers import BlipImageProcessorPil as _ImageProcessor
except ImportError:  # pragma: no cover
    from transformers import BlipImageProcessor as _ImageProcessor

_BASE_CORPUS = (
    "a photo of a cat sitting on a red couch", "a dog running across the green grass in a park",
    "two people riding bicycles down a city street", "a plate of food with broccoli and rice",
    "a man holding an umbrella in the rain", "a blue circle next to a yellow triangle",
    "what color is the shape? red", "what shape is in the image? circle", "is there a square? yes",
    "question: how many animals are there? short answer: two", "a train on the tracks near a station",
    "a bowl of fruit on a wooden table", "a child playing with a ball on the beach",
    "the sky is blue and the water is calm", "a black and white photo of a old building",
)


def build_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 160):
    """A T5 tokenizer whose Unigram vocabulary is trained now, offline (no sentencepiece needed).

    Ids 0/1/2 are ``<pad>``/``</s>``/``<unk>`` as in T5; deterministic for a given corpus and size.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    texts = list(corpus) if corpus is not None else list(_BASE_CORPUS)
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False,
    )
    tok.train_from_iterator(texts * 4, trainer=trainer)
    vocab = json.loads(tok.to_str())["model"]["vocab"]
    return T5Tokenizer(vocab=canonical_unigram_vocab(vocab), extra_ids=0)


TAIL_BAND = 2.5e-4  # the trainer's fallback pieces come in score steps of 1e-4


def canonical_unigram_vocab(vocab: list) -> list[tuple[str, float]]:
    """``[(piece, score), ...]`` in an order that depends on the pieces and scores alone.

    The Unigram trainer (Rust, hash-map order) lists equal-score pieces in any order, differs in the last digits
    of scores from one process to the next, and gives the characters it must keep a run of scores 1e-4 apart in
    hash order too. So: the three specials first, then pieces by score (6 decimals) and name; and within each run
    of pieces whose neighbouring scores are less than ``TAIL_BAND`` apart, names in sorted order on the run's scores
    (the same set of scores, handed out alphabetically). Token ids then follow from the corpus alone."""
    special = [(str(p), float(s)) for p, s in vocab[:3]]
    rest = sorted(((str(p), round(float(s), 6)) for p, s in vocab[3:]), key=lambda ps: (-ps[1], ps[0]))
    out: list[tuple[str, float]] = []
    i = 0
    while i < len(rest):
        j = i + 1
        while j < len(rest) and rest[j - 1][1] - rest[j][1] < TAIL_BAND:
            j += 1
        band = rest[i:j]
        out += list(zip(sorted(p for p, _ in band), (s for _, s in band)))
        i = j
    return special + out


def build_processor(tokenizer, num_query_tokens: int, image_size: int, qformer_tokenizer=None):
    """A ``Blip2Processor`` (CLIP mean/std, bicubic resize) that prepends ``num_query_tokens`` image tokens; with a
    ``qformer_tokenizer``, an ``InstructBlipProcessor`` (which also tokenises the prompt for the Q-Former)."""
    image_processor = _ImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
        do_convert_rgb=True,
    )
    if qformer_tokenizer is not None:
        from transformers import InstructBlipProcessor

        return InstructBlipProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                     qformer_tokenizer=qformer_tokenizer, num_query_tokens=num_query_tokens)
    return Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=num_query_tokens)


def class_tokens(vision_config) -> int:
    """1 for a tower that puts a class token before its patches (CLIP), 0 for one that does not (SigLIP)."""
    return 0 if vision_config.model_type == "siglip_vision_model" else 1


def build_llava_processor(tokenizer, config):
    """A ``LlavaProcessor`` (CLIP mean/std, bicubic resize) whose ``<image>`` expands to the patch tokens."""
    from transformers import LlavaProcessor

    tokenizer.add_tokens(["<image>"], special_tokens=True)
    size = int(config.vision_config.image_size)
    image_processor = _ImageProcessor(
        size={"height": size, "width": size},
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
        do_convert_rgb=True,
    )
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                          patch_size=int(config.vision_config.patch_size),
                          vision_feature_select_strategy=config.vision_feature_select_strategy,
                          num_additional_image_tokens=class_tokens(config.vision_config))  # CLIP's CLS
