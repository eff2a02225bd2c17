"""The method traits table (:mod:`ukmp.method_traits`) is the one place a method's data-free / own-plan / ratio-free
facts are declared: it covers every registered method and nothing else, the registry reads it, the config check
reads it without torch, and a registration that contradicts it is refused before anything is registered."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ukmp.method_traits import TRAITS, MethodTraits, method_traits


def test_every_registered_method_has_declared_traits_and_every_declaration_a_method():
    """Entry-point methods included (available_methods loads the ``ukmp.methods`` group)."""
    from ukmp.prune.methods import available_methods, is_data_free

    names = available_methods()
    assert len(names) >= 10  # the built-ins and the baselines were found
    assert sorted(set(names) - set(TRAITS)) == []
    assert sorted(set(TRAITS) - set(names)) == []  # no stale name left in the table
    for name in names:
        assert is_data_free(name) is TRAITS[name].data_free, name


def test_the_declared_facts():
    """What the parallel name lists said before the table (the same sets, so plans and stage hashes are unchanged)."""
    assert {n for n, t in TRAITS.items() if t.data_free} == {"random", "magnitude", "magnitude_sp"}
    assert {n for n, t in TRAITS.items() if t.plan == "own"} == {"flap", "upop", "ecoflap_sp"}
    assert {n for n, t in TRAITS.items() if t.plan != "shared"} == {"flap", "upop", "ecoflap_sp", "wanda_sp"}
    assert [n for n, t in TRAITS.items() if t.ratio_free] == ["ukmp", "llm_pruner_global"]
    assert method_traits("not-a-method") == MethodTraits()  # e.g. a method named by an old scores file


def test_registration_takes_or_adds_traits_and_refuses_a_contradiction(monkeypatch):
    import ukmp.method_traits as traits_module
    from ukmp.prune import methods

    monkeypatch.setattr(methods, "METHODS", dict(methods.METHODS))
    monkeypatch.setattr(traits_module, "TRAITS", dict(TRAITS))

    def fn(*a):
        raise AssertionError("never called")

    methods.register_method("plugin_a", fn, data_free=True)  # the older keyword alone
    methods.register_method("plugin_b", fn, traits=MethodTraits(plan="own", ratio_free=True))
    assert traits_module.method_traits("plugin_a") == MethodTraits(data_free=True)
    assert traits_module.method_traits("plugin_b") == MethodTraits(plan="own", ratio_free=True)
    methods.METHODS.pop("flap", None)
    with pytest.raises(ValueError, match=r"^prune\.method: 'flap' declares .* but ukmp\.method_traits has"):
        methods.register_method("flap", fn, traits=MethodTraits())
    assert "flap" not in methods.METHODS and traits_module.TRAITS["flap"].plan == "own"  # nothing half-written
    with pytest.raises(ValueError, match=r"^prune\.method: 'plugin_c' registered with data_free=True but traits"):
        methods.register_method("plugin_c", fn, data_free=True, traits=MethodTraits())
    assert "plugin_c" not in methods.METHODS and "plugin_c" not in traits_module.TRAITS


def test_the_table_and_the_config_check_load_without_torch():
    code = ("import sys; import ukmp.method_traits, ukmp.config; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))")
    subprocess.run([sys.executable, "-c", code], check=True)
