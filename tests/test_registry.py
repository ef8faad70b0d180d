"""The policy registry (`tova_vllm.policies.registry`): registering a policy,
the declaration rules it enforces, `Option` parsing and its messages, the
settings derived from the registry (`tova_vllm.config`), the
``tova_vllm.policies`` entry-point group, and the README's generated tables.

Every test that registers something runs under the `clean_registry` fixture,
which puts the registry back as it was, so other tests see only the
built-in policies."""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from tova_vllm import config
from tova_vllm.config import KVSettings, PolicyConfigError, engine_settings, request_settings
from tova_vllm.policies import (
    ENTRY_POINT_GROUP,
    TOVA,
    Candidates,
    EvictionPolicy,
    Option,
    PolicyOptionError,
    load_plugins,
    option,
    option_keys,
    policy_class,
    policy_classes,
    policy_names,
    register_policy,
)
from tova_vllm.policies import registry

BUILTIN = ("tova", "window", "sink", "h2o", "keydiff")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_registry():
    """Whatever a test registers is gone afterwards (names, option keys and the
    plugins-loaded flag restored)."""
    load_plugins()
    names, keys, loaded = dict(registry._REGISTRY), dict(registry._OPTION_KEYS), registry._plugins_loaded
    yield
    for name in set(registry._REGISTRY) - set(names):
        del registry._REGISTRY[name]
    for key in set(registry._OPTION_KEYS) - set(keys):
        del registry._OPTION_KEYS[key]
    registry._REGISTRY.update(names)
    registry._OPTION_KEYS.update(keys)
    registry._plugins_loaded = loaded
    assert tuple(registry._REGISTRY) == tuple(names) and registry._OPTION_KEYS == keys


def test_builtins_are_registered_in_order():
    assert policy_names() == BUILTIN  # (no plugin installed in this environment)
    assert [c.name for c in policy_classes()] == list(BUILTIN)
    assert option_keys() == {"kv_num_sinks": "sink", "kv_h2o_recent_ratio": "h2o"}
    assert policy_class("tova") is TOVA
    with pytest.raises(KeyError):
        policy_class("lru")
    assert ENTRY_POINT_GROUP == "tova_vllm.policies"


# ------------------------------------------------------------ registering


def make_lowest_norm():
    """A tiny policy in the docstring's style: keeps the keys with the highest
    L2 norm, with one integer and one float option."""

    @dataclass(frozen=True)
    class TestHighNorm(EvictionPolicy):
        """Keeps the keys with the highest norm (a test policy)."""

        name: ClassVar[str] = "test_highnorm"
        per_kv_head: ClassVar[bool] = True
        reads_keys: ClassVar[bool] = True

        protect_first: int = option(1, min=0, below_budget=True, help="first tokens always kept")
        power: float = option(2.0, key="kv_test_power", min=0, min_open=True, help="norm exponent")

        def priority(self, view):
            return view.keys.float().abs().pow(self.power).sum(-1)

    return TestHighNorm


def test_register_a_policy(clean_registry):
    cls = register_policy(make_lowest_norm())
    assert "test_highnorm" in policy_names() and policy_class("test_highnorm") is cls
    keys = [o.key for o in cls.options()]
    assert keys == ["kv_test_highnorm_protect_first", "kv_test_power"]  # default key: kv_<name>_<field>
    assert option_keys()["kv_test_power"] == "test_highnorm"
    assert cls.describe() == "Keeps the keys with the highest norm (a test policy)."
    # Idempotent for the same class (a module imported twice, a plugin loaded again).
    assert register_policy(cls) is cls
    assert register_policy(make_lowest_norm()) is cls  # same module + qualname
    # It runs like a built-in one.
    keys_t = torch.tensor([[[[1.0, 0], [3, 0], [2, 0]]]]).expand(1, 3, 3, 2)
    view = Candidates(newest=torch.tensor([2]), budget=torch.tensor([2]),
                      valid=torch.ones(1, 1, 3, dtype=torch.bool), num_kv_heads=3, keys=keys_t)
    assert cls().priority(view)[0, 0].tolist() == [1.0, 9.0, 4.0]


def test_a_registered_policys_options_are_settings(clean_registry):
    register_policy(make_lowest_norm())
    assert "kv_test_highnorm_protect_first" in config.settings_keys()
    assert "kv_test_power" in config.settings_keys()
    flags = {flag: (dest, typ, help) for flag, dest, typ, help in config.cli_settings()}
    dest, typ, help = flags["--kv-test-power"]
    assert dest == "kv_test_power" and typ is float
    assert help == "For --kv-policy test_highnorm: norm exponent (default 2.0, a number in (0, inf))."
    assert flags["--kv-test-highnorm-protect-first"][1] is int
    assert "test_highnorm" in flags["--kv-policy"][2]
    table = config.settings_table()
    assert (
        "| `kv_test_highnorm_protect_first` | `--kv-test-highnorm-protect-first` | `test_highnorm` only: "
        "first tokens always kept (default 1, an integer in [0, kv_budget - 1]) |" in table
    )
    assert "`test_highnorm`" in table.splitlines()[2]  # listed among kv_policy's values
    row = "| `test_highnorm` | Keeps the keys with the highest norm (a test policy). | per KV head | keys | exact |"
    assert row in config.policies_table()
    # Settings with it, at the engine and per request.
    s = engine_settings({"kv_policy": "test_highnorm", "kv_budget": 8, "kv_test_power": "0.5"})
    assert s.policy.power == 0.5 and s.policy.protect_first == 1
    assert KVSettings.from_json(s.to_json()) == s
    r = request_settings(s, {"kv_budget": 1})  # inherited, fitted below the budget
    assert r.policy.protect_first == 0 and r.policy.power == 0.5
    with pytest.raises(PolicyConfigError, match=r"^vllm_xargs\.kv_test_power applies to kv_policy='test_highnorm'"):
        request_settings(KVSettings(TOVA(), 8), {"kv_test_power": 1.0})
    with pytest.raises(PolicyConfigError, match=r"^vllm_xargs\.kv_test_power must be a number in \(0, inf\); got 0"):
        request_settings(s, {"kv_test_power": 0})


def test_duplicate_names_are_refused(clean_registry):
    register_policy(make_lowest_norm())

    @dataclass(frozen=True)
    class Other(EvictionPolicy):
        name: ClassVar[str] = "test_highnorm"

    with pytest.raises(ValueError, match=r"kv_policy 'test_highnorm' is registered twice"):
        register_policy(Other)

    @dataclass(frozen=True)
    class FakeTova(EvictionPolicy):
        name: ClassVar[str] = "tova"

    with pytest.raises(ValueError, match="registered twice"):
        register_policy(FakeTova)
    assert policy_class("tova") is TOVA


def test_duplicate_option_keys_are_refused(clean_registry):
    @dataclass(frozen=True)
    class Sinky(EvictionPolicy):
        name: ClassVar[str] = "test_sinky"
        n: int = option(1, key="kv_num_sinks", help="clashes with sink's")

    with pytest.raises(ValueError, match=r"'kv_num_sinks' of policy 'test_sinky' is already used by policy 'sink'"):
        register_policy(Sinky)
    assert "test_sinky" not in policy_names() and option_keys()["kv_num_sinks"] == "sink"


def test_an_option_key_repeated_within_a_policy_is_refused(clean_registry):
    @dataclass(frozen=True)
    class Twice(EvictionPolicy):
        name: ClassVar[str] = "test_twice"
        a: int = option(1, key="kv_test_twice", help="a")
        b: int = option(2, key="kv_test_twice", help="b")

    with pytest.raises((ValueError, TypeError)):
        register_policy(Twice)


@pytest.mark.parametrize("key", ["kv_policy", "kv_budget", "kv_prompt_mode", "kv_prompt_chunk"])
def test_an_option_key_equal_to_a_general_setting_is_refused(clean_registry, key):
    @dataclass(frozen=True)
    class Shadow(EvictionPolicy):
        name: ClassVar[str] = "test_shadow"
        x: int = option(1, key=key, help="shadows a general setting")

    try:
        with pytest.raises((ValueError, TypeError)):
            register_policy(Shadow)
    finally:
        # Registered or not, the general settings must still work for the others.
        assert engine_settings({"kv_policy": "tova", "kv_budget": 8}) == KVSettings(TOVA(), 8)


def test_declaration_rules(clean_registry):
    @dataclass(frozen=True)
    class Plain(EvictionPolicy):
        name: ClassVar[str] = "test_plain"
        x: int = 3  # not an option

    with pytest.raises(TypeError, match=r"Plain\.x: every field of an eviction policy must be an option"):
        register_policy(Plain)

    @dataclass(frozen=True)
    class BadKey(EvictionPolicy):
        name: ClassVar[str] = "test_badkey"
        x: int = option(3, key="num_x", help="x")

    with pytest.raises(TypeError, match=r"option keys start with 'kv_'; got 'num_x'"):
        register_policy(BadKey)

    @dataclass(frozen=True)
    class BadType(EvictionPolicy):
        name: ClassVar[str] = "test_badtype"
        x: bool = option(False, help="x")

    with pytest.raises(TypeError, match="option type must be int, float or str"):
        register_policy(BadType)

    for bad in ("none", "Upper", "two words", "1st", ""):
        cls = type("Named", (EvictionPolicy,), {"name": bad, "__annotations__": {}})
        with pytest.raises(TypeError, match="lower-case identifier"):
            register_policy(dataclass(frozen=True)(cls))

    @dataclass(frozen=True)
    class NoName(EvictionPolicy):
        pass

    with pytest.raises(TypeError, match="lower-case identifier"):
        register_policy(NoName)
    with pytest.raises(TypeError, match="EvictionPolicy subclass"):
        register_policy(int)  # type: ignore[arg-type]

    @dataclass(frozen=True)
    class FastHeadWise(EvictionPolicy):
        name: ClassVar[str] = "test_fast"
        per_kv_head: ClassVar[bool] = True
        reads_attention: ClassVar[bool] = True
        cuda_fast_path: ClassVar[bool] = True

    with pytest.raises(TypeError, match="CUDA fast path implements TOVA-like policies only"):
        register_policy(FastHeadWise)
    assert not {"test_plain", "test_badkey", "test_badtype", "test_fast"} & set(policy_names())


# ----------------------------------------------------------------- Option


def opt(type_, **kw) -> Option:
    return Option(key="kv_x", field="x", type=type_, default=kw.pop("default", 1), help="x", **kw)


def test_option_allowed_texts():
    assert opt(int).allowed() == "an integer"
    assert opt(float).allowed() == "a number"
    assert opt(str).allowed() == "str"
    assert opt(int, min=1).allowed() == "an integer in [1, inf)"
    assert opt(int, min=0, max=10).allowed() == "an integer in [0, 10]"
    assert opt(int, max=10).allowed() == "an integer in (-inf, 10]"
    assert opt(float, min=0, max=1, min_open=True, max_open=True).allowed() == "a number in (0, 1)"
    assert opt(float, min=0.5, max=2.5, max_open=True).allowed() == "a number in [0.5, 2.5)"
    assert opt(int, min=0, below_budget=True).allowed() == "an integer in [0, kv_budget - 1]"
    assert opt(int, min=0, below_budget=True).allowed(8) == "an integer in [0, 7]"
    assert opt(int, min=0).flag == "--kv-x"


def test_option_parse_ints():
    o = opt(int, min=0, max=10)
    assert o.parse(3) == 3 and o.parse("7") == 7 and o.parse(" 10 ") == 10 and o.parse(0) == 0
    for bad in (True, False, 1.5, 3.0, "x", "1.5", None, -1, 11, "11"):
        with pytest.raises(PolicyOptionError) as info:
            o.parse(bad)
        assert str(info.value) == f"kv_x must be an integer in [0, 10]; got {bad!r}"
    with pytest.raises(PolicyOptionError, match=r"^vllm_xargs\.kv_x must be an integer in \[0, 10\]; got 12$"):
        o.parse(12, where="vllm_xargs.")


def test_option_parse_floats():
    o = opt(float, min=0, max=1, min_open=True, max_open=True)
    assert o.parse(0.25) == 0.25 and o.parse("0.5") == 0.5
    assert o.parse(1e-9) == 1e-9
    v = opt(float, min=0).parse(2)
    assert v == 2.0 and isinstance(v, float)  # integers are numbers
    for bad in (0, 1, 0.0, 1.0, -0.5, 2, True, "abc", float("nan"), float("inf"), None):
        with pytest.raises(PolicyOptionError) as info:
            o.parse(bad)
        assert str(info.value) == f"kv_x must be a number in (0, 1); got {bad!r}"
    closed = opt(float, min=0, max=1)
    assert closed.parse(0) == 0.0 and closed.parse(1) == 1.0


def test_option_parse_below_budget_and_fit():
    o = opt(int, min=0, below_budget=True, default=4)
    assert o.parse(7, budget=8) == 7
    assert o.parse(100) == 100  # no budget known: no budget check
    with pytest.raises(PolicyOptionError, match=r"^kv_x must be an integer in \[0, 7\]; got 8$"):
        o.parse(8, budget=8)
    with pytest.raises(PolicyOptionError, match=r"\[0, 0\]; got 1$"):
        o.parse(1, budget=1)
    assert [o.fit(4, b) for b in (1, 2, 5, 64)] == [0, 1, 4, 4]
    assert opt(float, min=0).fit(0.7, 1) == 0.7  # only below-budget options are fitted


def test_option_parse_strings():
    o = opt(str, default="a")
    assert o.parse("abc") == "abc"
    with pytest.raises(PolicyOptionError, match=r"^kv_x must be str; got 3$"):
        o.parse(3)


# ------------------------------------------------------------ entry points


def make_dist(tmp_path: Path, name: str, entry_points: str, modules: dict[str, str]) -> Path:
    """A fake installed distribution on a new sys.path entry."""
    site = tmp_path / f"site_{name}"
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{textwrap.dedent(entry_points)}")
    for mod, src in modules.items():
        (site / f"{mod}.py").write_text(textwrap.dedent(src))
    return site


PLUGIN_SRC = """
    from dataclasses import dataclass
    from typing import ClassVar

    from tova_vllm.policies import EvictionPolicy, option


    @dataclass(frozen=True)
    class Oldest(EvictionPolicy):
        '''Keeps the oldest tokens (a test plugin).'''

        name: ClassVar[str] = "test_oldest"
        reads_positions: ClassVar[bool] = True

        keep: int = option(0, key="kv_test_oldest_keep", min=0, help="unused")

        def priority(self, view):
            return -view.positions[:, :1]
"""

PLUGIN_MODULE_SRC = """
    from dataclasses import dataclass
    from typing import ClassVar

    from tova_vllm.policies import EvictionPolicy, register_policy


    @register_policy
    @dataclass(frozen=True)
    class Newest(EvictionPolicy):
        name: ClassVar[str] = "test_newest"
        reads_positions: ClassVar[bool] = True

        def priority(self, view):
            return view.positions[:, :1]
"""


@pytest.fixture
def plugin_site(tmp_path, monkeypatch, clean_registry):
    """Make fake distributions importable; forget their modules afterwards."""
    added: list[str] = []

    def install(name: str, entry_points: str, modules: dict[str, str]) -> None:
        site = make_dist(tmp_path, name, entry_points, modules)
        monkeypatch.syspath_prepend(str(site))
        added.extend(modules)
        monkeypatch.setattr(registry, "_plugins_loaded", False)

    yield install
    for mod in added:
        sys.modules.pop(mod, None)


def test_entry_point_plugins_are_loaded(plugin_site):
    plugin_site(
        "tova_test_plugin",
        "oldest = tova_test_plugin_a:Oldest\nnewest = tova_test_plugin_b\n",
        {"tova_test_plugin_a": PLUGIN_SRC, "tova_test_plugin_b": PLUGIN_MODULE_SRC},
    )
    assert "tova_test_plugin_a" not in sys.modules
    load_plugins()
    assert registry._plugins_loaded
    names = policy_names()
    assert names[: len(BUILTIN)] == BUILTIN  # built-in ones first
    assert {"test_oldest", "test_newest"} <= set(names)
    assert option_keys()["kv_test_oldest_keep"] == "test_oldest"
    assert "kv_test_oldest_keep" in config.settings_keys()
    s = engine_settings({"kv_policy": "test_oldest", "kv_budget": 4})
    assert type(s.policy).__name__ == "Oldest"
    load_plugins()  # once per process: a second call does nothing
    assert policy_names() == names


def test_a_broken_plugin_fails_loudly_naming_it(plugin_site):
    plugin_site(
        "tova_broken_plugin",
        "broken = tova_test_broken:Policy\n",
        {"tova_test_broken": "raise ImportError('missing dependency frobnicate')\n"},
    )
    with pytest.raises(RuntimeError) as info:
        load_plugins()
    message = str(info.value)
    assert "eviction-policy plugin 'broken' (tova_test_broken:Policy) failed to load" in message
    assert "frobnicate" in message
    assert not registry._plugins_loaded  # not marked loaded: it fails again, not silently


def test_a_plugin_clashing_with_a_builtin_fails_loudly(plugin_site):
    plugin_site(
        "tova_clash_plugin",
        "clash = tova_test_clash\n",
        {"tova_test_clash": PLUGIN_MODULE_SRC.replace('"test_newest"', '"tova"')},
    )
    with pytest.raises(RuntimeError, match=r"plugin 'clash' \(tova_test_clash\) failed to load: .*registered twice"):
        load_plugins()
    assert registry._REGISTRY["tova"] is TOVA  # the built-in one stays
    with pytest.raises(RuntimeError, match="'clash'"):
        policy_names()  # every lookup keeps failing while the plugin is installed


# ------------------------------------------------------------------ README


def test_readme_holds_the_generated_tables():
    """The README's settings and policies tables are `tova_vllm.config`'s,
    verbatim (regenerate them with settings_table() / policies_table())."""
    readme = (ROOT / "README.md").read_text()
    assert config.settings_table() in readme
    assert config.policies_table() in readme
