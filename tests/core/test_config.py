"""RTNConfig / MagnitudeConfig: defaults, validation messages, immutability, round trips."""

import dataclasses

import pytest

from slimkit.config import Granularity, Scope
from slimkit.errors import ConfigError, SlimkitError
from slimkit.prune.magnitude import MagnitudeConfig
from slimkit.quant.rtn import RTNConfig


def test_rtn_defaults() -> None:
    c = RTNConfig()
    assert c.bits == 8
    assert c.granularity is Granularity.PER_CHANNEL
    assert c.symmetric is True
    assert c.targets == ("*",)
    assert c.ignore == ()
    assert (c.kind, c.method) == ("quantize", "rtn")


def test_magnitude_defaults() -> None:
    c = MagnitudeConfig()
    assert c.sparsity == 0.5
    assert c.scope is Scope.LAYER
    assert c.targets == ("*",)
    assert c.ignore == ()
    assert (c.kind, c.method) == ("prune", "magnitude")


def test_config_error_is_value_error_and_slimkit_error() -> None:
    with pytest.raises(ConfigError) as info:
        RTNConfig(bits=9)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, SlimkitError)


def test_bits_out_of_range_names_field_value_and_allowed() -> None:
    with pytest.raises(ValueError, match=r"quantize\.rtn\.bits: got 9; allowed: 2\.\.8"):
        RTNConfig(bits=9)
    with pytest.raises(ValueError, match=r"quantize\.rtn\.bits: got 1; allowed: 2\.\.8"):
        RTNConfig(bits=1)


def test_granularity_typo_suggests_and_lists_allowed() -> None:
    with pytest.raises(ConfigError) as info:
        RTNConfig(granularity="per_grup")  # type: ignore[arg-type]
    msg = str(info.value)
    assert "granularity" in msg
    assert "'per_grup'" in msg
    assert "did you mean 'per_group'?" in msg
    assert "per_tensor" in msg and "per_channel" in msg


def test_per_group_needs_a_group_size() -> None:
    with pytest.raises(ConfigError) as info:
        RTNConfig(granularity="per_group")  # type: ignore[arg-type]
    msg = str(info.value)
    assert msg.startswith("quantize.rtn.group_size: got None")
    assert "positive integer" in msg
    assert RTNConfig(granularity="per_group", group_size=64).group_size == 64  # type: ignore[arg-type]


def test_group_size_refused_without_per_group() -> None:
    with pytest.raises(ConfigError, match=r"group_size: got 64; allowed: null unless"):
        RTNConfig(group_size=64)


def test_granularity_accepts_string_values() -> None:
    assert RTNConfig(granularity="per_tensor").granularity is Granularity.PER_TENSOR  # type: ignore[arg-type]
    assert MagnitudeConfig(scope="global").scope is Scope.GLOBAL  # type: ignore[arg-type]


def test_scope_typo_suggests() -> None:
    with pytest.raises(
        ConfigError, match=r"prune\.magnitude\.scope: got 'globl' \(did you mean 'global'\?\)"
    ):
        MagnitudeConfig(scope="globl")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("cls", "field", "value", "allowed"),
    [
        (RTNConfig, "bits", "8", "an integer"),
        (RTNConfig, "bits", 8.0, "an integer"),
        (RTNConfig, "bits", True, "an integer"),
        (RTNConfig, "symmetric", 1, "true or false"),
        (RTNConfig, "symmetric", "yes", "true or false"),
        (MagnitudeConfig, "sparsity", "half", "a number"),
        (MagnitudeConfig, "sparsity", None, "a number"),
        (RTNConfig, "targets", "*", "a list"),
    ],
)
def test_wrong_type_names_field_value_and_allowed(
    cls: type, field: str, value: object, allowed: str
) -> None:
    with pytest.raises(ConfigError) as info:
        cls(**{field: value})
    msg = str(info.value)
    assert f"{cls.kind}.{cls.method}.{field}" in msg
    assert repr(value) in msg
    assert msg.endswith(f"allowed: {allowed}")


def test_wrong_element_type_names_the_index() -> None:
    with pytest.raises(ConfigError, match=r"quantize\.rtn\.targets\[1\]: got 1; allowed: a string"):
        RTNConfig(targets=["fc", 1])  # type: ignore[list-item]


def test_int_sparsity_is_coerced_to_float() -> None:
    c = MagnitudeConfig(sparsity=0)
    assert c.sparsity == 0.0
    assert type(c.sparsity) is float


@pytest.mark.parametrize("value", [1.0, 1, -0.1, 1.5, float("nan"), float("inf")])
def test_sparsity_out_of_range_refused(value: float) -> None:
    with pytest.raises(ConfigError) as info:
        MagnitudeConfig(sparsity=value)
    msg = str(info.value)
    assert "prune.magnitude.sparsity" in msg
    assert "[0, 1)" in msg


@pytest.mark.parametrize("value", [0.0, 0.5, 0.99])
def test_sparsity_in_range_accepted(value: float) -> None:
    assert MagnitudeConfig(sparsity=value).sparsity == value


def test_bad_regex_in_targets_names_pattern() -> None:
    with pytest.raises(ConfigError) as info:
        RTNConfig(targets=["re:fc(["])
    msg = str(info.value)
    assert "quantize.rtn.targets" in msg
    assert "bad regex" in msg
    assert "'re:fc(['" in msg


def test_bad_regex_in_ignore_names_field() -> None:
    with pytest.raises(ConfigError, match=r"prune\.magnitude\.ignore: bad regex"):
        MagnitudeConfig(ignore=["re:*x"])


def test_empty_targets_refused() -> None:
    with pytest.raises(
        ConfigError, match=r"quantize\.rtn\.targets: got \[\]; allowed: a non-empty"
    ):
        RTNConfig(targets=[])


def test_lists_become_tuples() -> None:
    c = RTNConfig(targets=["fc*", "re:conv\\d"], ignore=["head"])
    assert c.targets == ("fc*", "re:conv\\d")
    assert c.ignore == ("head",)


def test_frozen() -> None:
    c = RTNConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.bits = 4  # type: ignore[misc]
    m = MagnitudeConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.sparsity = 0.9  # type: ignore[misc]
    assert c.bits == 8 and m.sparsity == 0.5


def test_configs_are_hashable_and_compare_by_value() -> None:
    a = RTNConfig(targets=["fc"], granularity="per_tensor")  # type: ignore[arg-type]
    b = RTNConfig(targets=("fc",), granularity=Granularity.PER_TENSOR)
    assert a == b
    assert hash(a) == hash(b)
    assert a != RTNConfig()


@pytest.mark.parametrize(
    "config",
    [
        RTNConfig(),
        RTNConfig(granularity="per_tensor", symmetric=False, targets=["a.*"], ignore=["a.b"]),  # type: ignore[arg-type]
        MagnitudeConfig(),
        MagnitudeConfig(sparsity=0.25, scope="global", targets=["re:fc\\d+"]),  # type: ignore[arg-type]
    ],
)
def test_dict_and_yaml_round_trip(config: RTNConfig | MagnitudeConfig) -> None:
    d = config.to_dict()
    # plain data only: strings for enums, lists for tuples
    assert all(not isinstance(v, tuple) for v in d.values())
    assert isinstance(d["targets"], list)
    cls = type(config)
    assert cls.from_dict(d) == config
    text = config.to_yaml()
    assert "!!" not in text  # no python-specific YAML tags
    assert cls.from_yaml(text) == config


def test_to_dict_values() -> None:
    assert RTNConfig(granularity="per_tensor").to_dict() == {  # type: ignore[arg-type]
        "targets": ["*"],
        "ignore": [],
        "bits": 8,
        "granularity": "per_tensor",
        "group_size": None,
        "symmetric": True,
        "format": "affine",
    }


def test_from_yaml_empty_is_defaults() -> None:
    assert RTNConfig.from_yaml("") == RTNConfig()


def test_unknown_key_suggests_and_lists_allowed() -> None:
    with pytest.raises(ConfigError) as info:
        RTNConfig.from_dict({"bitz": 8})
    msg = str(info.value)
    assert "unknown key 'bitz'" in msg
    assert "did you mean 'bits'?" in msg
    assert "allowed: targets, ignore, bits, granularity, group_size, symmetric, format" in msg


def test_unknown_key_with_where_prefix() -> None:
    with pytest.raises(
        ConfigError, match=r"^here: unknown key 'sparsty' \(did you mean 'sparsity'\?\)"
    ):
        MagnitudeConfig.from_dict({"sparsty": 0.5}, where="here")


def test_unknown_key_far_from_any_has_no_suggestion() -> None:
    with pytest.raises(ConfigError) as info:
        RTNConfig.from_dict({"zzzzzz": 1})
    assert "did you mean" not in str(info.value)


def test_from_dict_refuses_non_mapping() -> None:
    with pytest.raises(ConfigError, match="expected a mapping"):
        RTNConfig.from_dict([("bits", 8)])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="expected a mapping"):
        RTNConfig.from_yaml("- 8\n")
