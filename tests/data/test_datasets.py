"""Dataset loaders on the generated sample data, and their one-line errors for bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ukmp.data.config import load_dataset_config
from ukmp.data.loaders import LOADERS, load_dataset
from ukmp.data.records import (
    CaptionEvalDataset,
    ImageTextDataset,
    RetrievalDataset,
    VQADataset,
)
from ukmp.data.sample import write_sample_data

REPO = Path(__file__).resolve().parents[2]
N = 6


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_sample_data(tmp_path_factory.mktemp("sample"), n_images=N, seed=0)


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg, msg
    return msg


def _copy_with(sample_yaml: Path, tmp_path: Path, **changes) -> Path:
    """A copy of a sample YAML with some keys changed (paths stay relative to the sample root)."""
    data = OmegaConf.to_container(OmegaConf.load(sample_yaml))
    data.update(changes)
    out = tmp_path / sample_yaml.name
    out.write_text(OmegaConf.to_yaml(OmegaConf.create(data)))
    return out


def _root(sample_yaml: Path) -> Path:
    return Path(OmegaConf.load(sample_yaml).root)


# ---------------------------------------------------------------------------------------------------- reading
def test_sample_covers_every_loader(sample):
    assert set(sample) == set(LOADERS)


def test_cc595k_uses_blip_caption_then_raw_caption(sample):
    ds = load_dataset(sample["cc595k"])
    assert isinstance(ds, ImageTextDataset) and len(ds) == N and ds.split == "train"
    meta = json.loads((_root(sample["cc595k"]) / "cc595k/metadata.json").read_text())
    for rec, raw in zip(ds, meta):
        assert rec.caption == raw.get("blip_caption", raw["caption"])
    # both branches are exercised by the sample data
    assert any("blip_caption" in r for r in meta) and any("blip_caption" not in r for r in meta)


def test_cc595k_reads_llava_chat_json(sample, tmp_path):
    chat = [{"id": "GCC_1", "image": "val2014/COCO_val2014_000000000001.png",
             "conversations": [{"from": "human", "value": "Describe.\n<image>"}, {"from": "gpt", "value": "a dot"}]}]
    (tmp_path / "chat.json").write_text(json.dumps(chat))
    ds = load_dataset(_copy_with(sample["cc595k"], tmp_path, annotations=str(tmp_path / "chat.json")))
    assert ds[0].caption == "a dot" and ds[0].id == "GCC_1"


def test_caption_json(sample):
    ds = load_dataset(sample["caption"])
    assert isinstance(ds, ImageTextDataset) and len(ds) == N and ds[0].id == "coco_1"


@pytest.mark.parametrize("name", ["vqav2", "okvqa"])
def test_vqa_ten_answers(sample, name):
    ds = load_dataset(sample[name])
    assert isinstance(ds, VQADataset) and len(ds) == (2 * N if name == "vqav2" else N)
    assert all(len(r.answers) == 10 for r in ds)
    gts = ds.gts()
    assert len(gts) == len(ds) and gts[ds[0].question_id] == list(ds[0].answers)


def test_gqa_single_answer(sample):
    ds = load_dataset(sample["gqa"])
    assert isinstance(ds, VQADataset) and len(ds) == 2 * N
    gts = ds.single_gts()
    assert gts[ds[0].question_id] == "yes"


@pytest.mark.parametrize(("name", "first_id"), [("nocaps", 0), ("coco_karpathy", 1)])
def test_caption_eval_refs(sample, name, first_id):
    ds = load_dataset(sample[name])
    assert isinstance(ds, CaptionEvalDataset) and len(ds) == N
    # NoCaps ids come from "img_id"; COCO ids from the number at the end of the file name (LAVIS)
    assert ds[0].image_id == first_id
    assert set(ds.refs) == {r.image_id for r in ds} and all(len(v) == 5 for v in ds.refs.values())


def test_coco_karpathy_without_gt_uses_record_captions(sample, tmp_path):
    full = load_dataset(sample["coco_karpathy"])
    no_gt = load_dataset(_copy_with(sample["coco_karpathy"], tmp_path, gt=None))
    assert no_gt.refs == full.refs


def test_nocaps_from_coco_file_alone(sample, tmp_path):
    coco_only = _copy_with(sample["nocaps"], tmp_path, annotations="nocaps/nocaps_val_4500_captions.json", gt=None)
    ds = load_dataset(coco_only)
    assert ds.refs == load_dataset(sample["nocaps"]).refs


def test_flickr_retrieval_indices(sample):
    ds = load_dataset(sample["flickr30k"], max_samples=3)
    assert isinstance(ds, RetrievalDataset) and len(ds) == 3
    assert len(ds.texts) == 15 and ds.txt2img == [i for i in range(3) for _ in range(5)]
    assert ds.img2txt[1] == [5, 6, 7, 8, 9] and ds.texts[5] == ds[1].captions[0]


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_open_image_and_max_samples(sample, name):
    ds = load_dataset(sample[name], max_samples=2)
    assert len(ds) == 2
    img = ds.open_image(1)
    assert img.mode == "RGB" and img.size == (64, 64)


def test_official_vqa_and_gqa_formats(sample, tmp_path):
    questions = {"data_subtype": "val2014", "questions": [
        {"question_id": 10, "image_id": 1, "question": "What color?"}]}
    annotations = {"annotations": [{"question_id": 10, "image_id": 1,
                                    "answers": [{"answer": "red", "answer_id": k + 1} for k in range(10)]}]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    ds = load_dataset(_copy_with(sample["vqav2"], tmp_path, annotations=[str(tmp_path / "q.json"),
                                                                         str(tmp_path / "a.json")]))
    assert ds[0].image == "val2014/COCO_val2014_000000000001.jpg" and ds.gts() == {10: ["red"] * 10}
    (tmp_path / "gqa.json").write_text(json.dumps({"201": {"imageId": "n42", "question": "Is it?", "answer": "no"}}))
    gqa = load_dataset(_copy_with(sample["gqa"], tmp_path, annotations=str(tmp_path / "gqa.json")))
    assert gqa[0].image == "n42.jpg" and gqa.single_gts() == {"201": "no"}


def test_sample_data_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_sample_data(a, n_images=3, seed=1)
    write_sample_data(b, n_images=3, seed=1)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.suffix != ".yaml")
    assert files and files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.suffix != ".yaml")
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    c = tmp_path / "c"
    write_sample_data(c, n_images=3, seed=2)  # non-vacuous: another seed changes the images
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files if f.suffix == ".png")


def test_repo_configs_parse(monkeypatch):
    monkeypatch.setenv("UKMP_DATA_ROOT", "/data/root")
    paths = sorted((REPO / "configs" / "datasets").glob("*.yaml"))
    assert {p.stem for p in paths} == set(LOADERS)
    for p in paths:
        cfg = load_dataset_config(p)
        assert cfg.format in LOADERS and cfg.images.is_relative_to("/data/root")
        assert all(a.is_relative_to("/data/root") for a in cfg.annotations)


# ------------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name", sorted(LOADERS))
def test_missing_annotation_file(sample, tmp_path, name):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError) as err:
        load_dataset(_copy_with(sample[name], tmp_path, annotations=str(missing)))
    msg = _one_line(err.value)
    assert str(missing) in msg and "'annotations'" in msg


def test_missing_gt_file_and_images_dir(sample, tmp_path):
    with pytest.raises(FileNotFoundError, match="'gt'") as err:
        load_dataset(_copy_with(sample["nocaps"], tmp_path, gt=str(tmp_path / "gt.json")))
    assert str(tmp_path / "gt.json") in _one_line(err.value)
    with pytest.raises(FileNotFoundError, match="'images'") as err:
        load_dataset(_copy_with(sample["okvqa"], tmp_path, images=str(tmp_path / "imgs")))
    _one_line(err.value)


MISSING_KEYS = {
    "cc595k": ("cc595k/metadata.json", "image"),
    "caption": ("caption/coco_karpathy_train.json", "caption"),
    "vqav2": ("vqav2/vqa_val_eval.json", "question_id"),
    "okvqa": ("okvqa/okvqa_val_eval.json", "question"),
    "gqa": ("gqa/testdev_balanced_questions.json", "answer"),
    "nocaps": ("nocaps/nocaps_val.json", "img_id"),
    "coco_karpathy": ("coco_karpathy/coco_karpathy_test.json", "image"),
    "flickr30k": ("flickr30k/flickr30k_test.json", "caption"),
}


@pytest.mark.parametrize("name", sorted(MISSING_KEYS))
def test_missing_key_in_a_record(sample, tmp_path, name):
    rel, key = MISSING_KEYS[name]
    records = json.loads((_root(sample[name]) / rel).read_text())
    del records[2][key]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    with pytest.raises(ValueError) as err:
        load_dataset(_copy_with(sample[name], tmp_path, annotations=str(bad)))
    msg = _one_line(err.value)
    assert str(bad) in msg and f"'{key}'" in msg and "record 2" in msg


def test_missing_key_in_coco_gt(sample, tmp_path):
    gt = json.loads((_root(sample["nocaps"]) / "nocaps/nocaps_val_4500_captions.json").read_text())
    del gt["annotations"][4]["caption"]
    bad = tmp_path / "gt.json"
    bad.write_text(json.dumps(gt))
    with pytest.raises(ValueError) as err:
        load_dataset(_copy_with(sample["nocaps"], tmp_path, gt=str(bad)))
    msg = _one_line(err.value)
    assert str(bad) in msg and "'caption'" in msg and "record 4" in msg


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_unreadable_and_missing_image(sample, tmp_path, name):
    ds = load_dataset(sample[name], max_samples=1)
    images = tmp_path / "images"
    target = images / ds[0].image
    target.parent.mkdir(parents=True)
    target.write_bytes(b"this is not a png")
    ds = load_dataset(_copy_with(sample[name], tmp_path, images=str(images)), max_samples=1)
    with pytest.raises(ValueError) as err:
        ds.open_image(0)
    msg = _one_line(err.value)
    assert str(target) in msg and "'image'" in msg and str(ds.origins[0].file) in msg
    os.remove(target)
    with pytest.raises(FileNotFoundError) as err:
        ds.open_image(0)
    assert str(target) in _one_line(err.value)


def test_bad_yaml_keys(sample, tmp_path):
    with pytest.raises(ValueError, match="unknown key 'imgs'") as err:
        load_dataset(_copy_with(sample["gqa"], tmp_path, imgs="x"))
    _one_line(err.value)
    data = OmegaConf.to_container(OmegaConf.load(sample["gqa"]))
    del data["images"]
    cfg = tmp_path / "noimages.yaml"
    cfg.write_text(OmegaConf.to_yaml(OmegaConf.create(data)))
    with pytest.raises(ValueError, match="missing key 'images'"):
        load_dataset(cfg)
    with pytest.raises(ValueError, match="key 'format'"):
        load_dataset(_copy_with(sample["gqa"], tmp_path, format="coco_retrieval"))
    with pytest.raises(FileNotFoundError, match="dataset config not found"):
        load_dataset(tmp_path / "absent.yaml")


def test_invalid_json_names_the_file(sample, tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text("[{\"image\": ")
    with pytest.raises(ValueError) as err:
        load_dataset(_copy_with(sample["flickr30k"], tmp_path, annotations=str(bad)))
    assert str(bad) in _one_line(err.value)
