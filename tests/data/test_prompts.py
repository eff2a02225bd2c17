"""Prompt styles (dataset YAML ``prompt_style``) and SmolVLM's image input.

* ``template``: the processor's chat template on one user turn (image + prompt) with the generation prompt; the
  ids equal a hand-built expectation and what the stock processor's ``apply_chat_template(tokenize=True)`` gives
  (its trailing ``</s>``, which the tiny T5 tokenizer appends, aside: a prompt is continued, never closed). In
  fine-tuning batches the answer after the templated prompt is the only target; in evaluation the model generates
  from the templated ids.
* the default: ``template`` for instruction-tuned families with a chat template, ``plain`` otherwise; an explicit
  ``template`` without a chat template, on an encoder-decoder, or a bad value is refused in one line.
* SmolVLM: the collator's pixels and ids equal the stock Idefics3 processor's for the same image and text
  (pixels within 1e-6: float32 rounding of the same arithmetic; the normalisation alone moves them by > 0.1).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ukmp.data.batches import make_collator
from ukmp.data.prompts import PromptIds, dataset_style, resolve_style
from ukmp.data.records import ImageTextDataset, ImageTextRecord, Origin
from ukmp.models import adapter_for
from ukmp.models.build import build_tiny

# a LLaVA-1.5-like chat template in the tiny vocabulary (lower case: the tiny tokenizer knows no capitals)
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
            "<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
            "{% if add_generation_prompt %} assistant:{% endif %}")
NO_IMAGE = TEMPLATE.replace("<image> ", "")  # a template that writes no image placeholder
QUESTION = "what color is the shape?"


def _tiny(name: str, template: str | None = TEMPLATE):
    model, proc = build_tiny(name=name)
    proc.chat_template = template
    return model, proc, adapter_for(model).batch_layout()


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8"))


def _stock_ids(proc, text: str, template: bool) -> list[int]:
    """The stock processor's ids for one image and ``text``, less the trailing ``</s>`` of the tiny tokenizer."""
    if template:
        conv = [{"role": "user", "content": [{"type": "image", "image": _image(40, 30)},
                                             {"type": "text", "text": text}]}]
        ids = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True)
    else:
        ids = proc(images=[_image(40, 30)], text=["<image>" + text])
    ids = list(ids["input_ids"][0])
    assert ids[-1] == proc.tokenizer.eos_token_id
    return ids[:-1]


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-smolvlm"])
def test_template_ids_equal_hand_built_and_the_stock_processor(name):
    _, proc, layout = _tiny(name)
    tok = proc.tokenizer
    words = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    n = layout.image_tokens
    if name == "tiny-llava":
        image = [layout.image_token_id] * n
    else:  # <fake_token_around_image><global-img> + image tokens + <fake_token_around_image>
        fake, glob = tok.convert_tokens_to_ids(["<fake_token_around_image>", "<global-img>"])
        image = [fake, glob] + [layout.image_token_id] * n + [fake]
    hand = words("user: ") + image + words(f" {QUESTION} assistant:")
    templated = PromptIds(proc, layout, "template")(QUESTION)
    assert templated == hand
    assert templated == _stock_ids(proc, QUESTION, template=True)
    plain = PromptIds(proc, layout, "plain")(QUESTION)
    assert plain == image + words(QUESTION) != templated  # the template changes the ids (not vacuous)


def test_template_without_placeholder_puts_the_image_first_as_instructblip_does():
    _, proc, layout = _tiny("tiny-instructblip-llama", NO_IMAGE)
    ids = PromptIds(proc, layout, "template")(QUESTION)
    assert ids == [layout.image_token_id] * layout.image_tokens + proc.tokenizer(
        f"user: {QUESTION} assistant:", add_special_tokens=False)["input_ids"]
    assert ids == _stock_ids(proc, QUESTION, template=True)


def test_finetune_batch_targets_are_the_answer_after_the_template():
    """Decoder-only fine-tuning batch in ``template`` style: each row is the templated prompt (the caption prefix
    in the user turn) then the suffix and ``eos``, and the labels (aligned with the logits) are exactly those."""
    _, proc, layout = _tiny("tiny-llava")
    caps = ["a dog running across the green grass in a park", "a red circle next to a blue square"]
    ds = ImageTextDataset("t", "train", [ImageTextRecord(str(i), "x.png", c) for i, c in enumerate(caps)],
                          [Origin(__file__, i) for i in range(2)], ".")
    ds.open_image = lambda i: _image(40, 30, i)
    tok = proc.tokenizer
    prompt = PromptIds(proc, layout, "template", 32)
    for style in ("template", "plain"):
        col = make_collator(ds, proc, layout, max_text_tokens=32, augment=False, seed=0, prompt_style=style)
        batch = col([0, 1])
        for r in range(2):
            prefix, suffix = col.texts(r)
            head = prompt(prefix) if style == "template" else PromptIds(proc, layout, "plain", 32)(prefix)
            tail = tok(" " + suffix, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            n = int(batch["attention_mask"][r].sum())
            assert batch["input_ids"][r, :n].tolist() == head + tail
            lab = batch["labels"][r]
            assert (lab[: len(head) - 1] == -100).all() and (lab[n - 1:] == -100).all()
            assert lab[len(head) - 1: n - 1].tolist() == tail
        if style == "template":
            assert head[-len(tok(" assistant:", add_special_tokens=False)["input_ids"]):] == tok(
                " assistant:", add_special_tokens=False)["input_ids"]


def test_evaluation_generates_from_the_templated_prompt(sample_data, monkeypatch):
    """evaluate_vqa hands ``generate`` the template's ids (left-padded) when the dataset asks for it."""
    from ukmp.data.loaders import load_dataset
    from ukmp.eval.evaluators import evaluate_vqa
    from ukmp.eval.text import VQA_PROMPT, blip_question

    model, proc, layout = _tiny("tiny-llava")
    ds = load_dataset(sample_data["okvqa"], max_samples=2)
    seen = []

    def generate(**kw):
        seen.append(kw["input_ids"])
        return torch.cat([kw["input_ids"], torch.full((2, 1), 5)], dim=1)

    monkeypatch.setattr(model, "generate", generate)
    for style in ("template", "plain"):
        evaluate_vqa(model, proc, ds, image_size=layout.image_size, batch_size=2, num_beams=1, progress=False,
                     prompt_style=style)
        rows = [PromptIds(proc, layout, style)(VQA_PROMPT.format(blip_question(r.question))) for r in ds]
        width = max(map(len, rows))
        for r, row in enumerate(rows):
            assert seen[-1][r, width - len(row):].tolist() == row
    assert seen[0].shape != seen[1].shape  # the template is longer than the plain prompt


def test_default_style_per_family_and_refusals(sample_data):
    from ukmp.data.loaders import load_dataset

    ds = load_dataset(sample_data["okvqa"])
    for name, template, want in [("tiny-llava", TEMPLATE, "template"), ("tiny-llava", None, "plain"),
                                 ("tiny-smolvlm", TEMPLATE, "template"),
                                 ("tiny-instructblip-llama", TEMPLATE, "template"),
                                 ("tiny-blip2-opt", TEMPLATE, "plain"), ("tiny", TEMPLATE, "plain")]:
        model, proc, _ = _tiny(name, template)
        assert dataset_style(ds, proc, model.config, "okvqa") == want, name
        assert resolve_style("plain", proc, model.config, "x") == "plain"
    model, proc, _ = _tiny("tiny-llava", None)
    ds.prompt_style = "template"
    with pytest.raises(ValueError) as e:
        dataset_style(ds, proc, model.config, "okvqa")
    msg = str(e.value)
    assert msg.startswith("eval task 'okvqa' (") and "prompt_style 'template'" in msg and "\n" not in msg
    model, proc, _ = _tiny("tiny", TEMPLATE)  # BLIP-2 FlanT5: the encoder reads the prompt
    with pytest.raises(ValueError, match="needs a decoder-only language model"):
        dataset_style(ds, proc, model.config, "okvqa")


@pytest.mark.parametrize("value, fmt, message", [
    ("chat", "okvqa", "key 'prompt_style' must be one of template, plain"),
    ("template", "text", "'prompt_style': a 'text' dataset has no prompts"),
])
def test_bad_prompt_style_in_a_yaml_is_refused_in_one_line(tmp_path, value, fmt, message):
    from ukmp.data.config import load_dataset_config

    path = tmp_path / "bad.yaml"
    path.write_text(f"format: {fmt}\nannotations: a.json\nimages: img\nprompt_style: {value}\n")
    with pytest.raises(ValueError) as e:
        load_dataset_config(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value) and "\n" not in str(e.value)
    path.write_text(f"format: {fmt}\nannotations: a.json\nimages: img\n" + ("prompt_style: plain\n" if fmt != "text"
                                                                             else ""))
    assert load_dataset_config(path).prompt_style == ("plain" if fmt != "text" else None)


@pytest.mark.parametrize("size", [(40, 30), (31, 50), (32, 32), (97, 20)])
def test_smolvlm_collator_equals_the_stock_processor(size):
    """Pixels (longest edge, then square, Lanczos, mean/std 0.5) and ids (the image wrapped in
    ``<fake_token_around_image><global-img>`` ... ``<fake_token_around_image>``) of the SmolVLM collator equal the
    stock Idefics3 processor's for the same image and text, in both prompt styles."""
    from ukmp.data.images import CLIP_MEAN, CLIP_STD, ImageTransform

    _, proc, layout = _tiny("tiny-smolvlm")
    img = _image(*size, seed=size[0])
    ds = ImageTextDataset("t", "train", [ImageTextRecord("0", "x.png", "a red circle next to a blue square")],
                          [Origin(__file__, 0)], ".")
    ds.open_image = lambda i: img
    for style in ("plain", "template"):
        col = make_collator(ds, proc, layout, max_text_tokens=32, augment=False, seed=0, prompt_style=style)
        batch = col([0])
        prefix, _ = col.texts(0)
        if style == "template":
            conv = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": prefix}]}]
            stock = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                             return_tensors="pt")
        else:
            stock = proc(images=[img], text=["<image>" + prefix], return_tensors="pt")
        ids = stock["input_ids"][0, :-1].tolist()  # less the tiny tokenizer's trailing </s>
        assert batch["input_ids"][0, : len(ids)].tolist() == ids
        pix = stock["pixel_values"][0, 0]
        assert tuple(pix.shape) == tuple(batch["pixel_values"][0].shape) == (3, 32, 32)
        assert (batch["pixel_values"][0] - pix).abs().max().item() <= 1e-6
    clip = ImageTransform(32, mean=CLIP_MEAN, std=CLIP_STD, resize="idefics3")(img)
    assert (clip - pix).abs().max().item() > 0.1  # CLIP's normalisation would not match


def test_a_set_prompt_style_enters_the_stage_hashes(sample_data, tmp_path):
    """A YAML that sets ``prompt_style`` adds it to the hash of the stages reading it (a changed style reruns
    them); YAMLs without it and sample specs add nothing, so the hashes of older configs hold."""
    from ukmp.pipeline import prompt_parts, with_prompt_styles

    plain = tmp_path / "okvqa.yaml"
    text = sample_data["okvqa"].read_text()
    plain.write_text(text)
    assert prompt_parts([str(plain), "sample:okvqa", None]) == []
    assert with_prompt_styles([1], [str(plain)]) == [1]
    plain.write_text(text + "\nprompt_style: template\n")
    assert with_prompt_styles([1], [str(plain)]) == [1, [(str(plain), "template")]]


def test_the_eval_stage_reads_the_yaml_style_and_names_the_task(sample_data, tmp_path):
    """``eval.datasets`` YAML with ``prompt_style: template`` on a model whose processor has no chat template: the
    evaluation stops before generating, in one line naming the task, its file and the key."""
    from ukmp.config import load_config
    from ukmp.eval.stage import run_eval_stage

    yaml = tmp_path / "okvqa.yaml"
    yaml.write_text(sample_data["okvqa"].read_text() + "\nprompt_style: template\n")
    cfg = load_config(None, [f"output_dir={tmp_path}", "model.source=tiny-llava", f"eval.datasets.okvqa={yaml}",
                             "eval.max_samples=2"])
    with pytest.raises(ValueError) as e:
        run_eval_stage(cfg, None, ["okvqa"], tmp_path / "eval")
    msg = str(e.value)
    assert msg.startswith(f"eval task 'okvqa' ({yaml}): prompt_style 'template'") and "\n" not in msg
    assert not (tmp_path / "eval" / "metrics.json").exists()
