import json

from ukmp.cli import main


def test_inspect_full_size_config(capsys):
    assert main(["inspect", "blip2-flan-t5-xl", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    k = r["group_kinds"]
    assert (k["vit_heads"]["layers"], k["vit_heads"]["units_per_layer"]) == (39, 16)
    assert (k["vit_mlp"]["layers"], k["vit_mlp"]["units_per_layer"]) == (39, 6144)
    assert (k["enc_heads"]["layers"], k["enc_heads"]["units_per_layer"]) == (24, 32)
    assert (k["enc_ffn"]["layers"], k["enc_ffn"]["units_per_layer"]) == (24, 5120)
    assert (k["dec_self_heads"]["layers"], k["dec_self_heads"]["units_per_layer"]) == (24, 32)
    assert (k["dec_cross_heads"]["layers"], k["dec_cross_heads"]["units_per_layer"]) == (24, 32)
    assert (k["dec_ffn"]["layers"], k["dec_ffn"]["units_per_layer"]) == (24, 5120)
    # UKMP_METHOD.md §1.2: 4*1408*88 weights per ViT head (+ 3*88 q/k/v bias entries), 2*1408 (+1) per channel
    assert k["vit_heads"]["params_per_unit"] == 4 * 1408 * 88 + 3 * 88
    assert k["vit_mlp"]["params_per_unit"] == 2 * 1408 + 1
    assert k["enc_heads"]["params_per_unit"] == 4 * 2048 * 64
    assert k["enc_ffn"]["params_per_unit"] == 3 * 2048
    p = r["parameters"]
    # §1.4: about 3.94B in total (ViT 0.986B, T5 2.850B, Q-Former + projection ~0.107B), 3.702B prunable
    assert abs(p["total"] / 1e9 - 3.94) < 0.005
    assert abs(p["by_modality"]["vision"] / 1e9 - 0.986) < 0.001
    assert abs(p["by_modality"]["language"] / 1e9 - 2.850) < 0.001
    assert abs(p["prunable"] / 1e9 - 3.702) < 0.001
    assert p["total"] == sum(p["by_modality"].values())
    # "50%" of the whole model is ~53% of the prunable weights
    assert abs(0.5 * p["total"] / p["prunable"] - 0.53) < 0.005


def test_inspect_pruned_dir_and_errors(tmp_path, capsys):
    assert main(["demo", "--structure-only", "--out", str(tmp_path / "demo")]) == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "demo" / "pruned"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["pruned"] and r["parameters"]["total"] == summary["parameters"]["pruned"]
    assert r["parameters"]["removed"] == summary["parameters"]["removed"] > 0
    assert main(["inspect", str(tmp_path / "nope.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope.json" in err and "\n" not in err


def test_config_files_and_overrides_split():
    """An override whose value is a YAML path stays an override; a path with no ``key=`` is a config file."""
    from ukmp.cli import _split_config_args

    configs, overrides = _split_config_args(
        ["configs/ukmp_0.5.yaml", "data.calibration=/data/cc595k.yaml", "prune.ratio=0.3", "extra.yml",
         "/runs/a=b.yaml"])
    assert configs == ["configs/ukmp_0.5.yaml", "extra.yml", "/runs/a=b.yaml"]
    assert overrides == ["data.calibration=/data/cc595k.yaml", "prune.ratio=0.3"]
