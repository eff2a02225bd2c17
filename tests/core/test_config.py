import pytest

from ukmp.config import ConfigError, RunConfig, describe, load_config, section_hash


def test_yaml_chain_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\nprune:\n  ratio: 0.3\n  batch_size: 2\n")
    (tmp_path / "run.yaml").write_text("defaults: [base.yaml]\nname: run\nprune:\n  ratio: 0.5\n")
    cfg = load_config(tmp_path / "run.yaml", ["prune.batch_size=4", "eval.after_prune=[gqa]"])
    assert isinstance(cfg, RunConfig)
    assert (cfg.name, cfg.prune.ratio, cfg.prune.batch_size, cfg.eval.after_prune) == ("run", 0.5, 4, ["gqa"])


@pytest.mark.parametrize(
    "yaml_text, overrides, needle",
    [
        ("prune:\n  ratoi: 0.5\n", [], "prune.ratoi"),
        ("", ["prune.nope=1"], "override 'prune.nope'"),
        ("", ["prune.ratio=abc"], "override 'prune.ratio'"),
        ("", ["prune.taylor=third"], "prune.taylor"),
        ("", ["prune.ratio=1.5"], "prune.ratio"),
        ("", ["finetune.schedule=fast"], "finetune.schedule"),
        ("", ["noequals"], "expected key=value"),
    ],
)
def test_bad_config_is_one_line_error_naming_the_key(tmp_path, yaml_text, overrides, needle):
    f = tmp_path / "c.yaml"
    f.write_text(yaml_text or "name: x\n")
    with pytest.raises(ConfigError) as e:
        load_config(f, overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_missing_file_and_shipped_configs_parse(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    for name in ("ukmp_0.5.yaml", "ukmp_0.2.yaml"):
        cfg = load_config(root / name)
        assert cfg.model.source == "Salesforce/blip2-flan-t5-xl" and cfg.prune.method == "ukmp"
    c2 = load_config(root / "ukmp_0.2.yaml")
    assert (c2.prune.ratio, c2.finetune.batch_size, c2.finetune.lr, c2.finetune.warmup_steps) == (0.2, 10, 1e-5, 100)
    c5 = load_config(root / "ukmp_0.5.yaml")
    assert (c5.prune.ratio, c5.finetune.batch_size, c5.finetune.lr, c5.finetune.warmup_steps) == (0.5, 20, 2e-5, 50)


def test_section_hash_is_stable_and_sensitive():
    a, b = RunConfig(), RunConfig()
    assert section_hash(a.prune) == section_hash(b.prune)
    b.prune.ratio = 0.3
    assert section_hash(a.prune) != section_hash(b.prune)
    assert any(line.startswith("prune.ratio = ") for line in describe())
