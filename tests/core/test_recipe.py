"""Recipes: parsing the shipped files, round trips, and one clear message per mistake."""

from pathlib import Path

import pytest

from slimkit.config import Granularity, Scope
from slimkit.errors import ConfigError, RecipeError, SlimkitError
from slimkit.prune.magnitude import MagnitudeConfig
from slimkit.quant.rtn import RTNConfig
from slimkit.recipe import Recipe, as_recipe, resolve, shipped, shipped_dir

W8 = shipped_dir() / "w8-rtn.yaml"
PRUNE50 = shipped_dir() / "prune-magnitude-50.yaml"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def recipe_error(tmp_path: Path, text: str) -> tuple[str, Path]:
    """The message of the RecipeError raised when reading ``text`` from a file."""
    p = write(tmp_path / "bad.yaml", text)
    with pytest.raises(RecipeError) as info:
        Recipe.from_file(p)
    assert isinstance(info.value, ConfigError | SlimkitError)
    return str(info.value), p


def test_shipped_recipes_listed() -> None:
    assert {"w8-rtn", "prune-magnitude-50"} <= set(shipped())


def test_shipped_w8_rtn_parses() -> None:
    r = Recipe.from_file(W8)
    assert r.name == "w8-rtn"
    assert r.stages == (
        RTNConfig(bits=8, granularity=Granularity.PER_CHANNEL, symmetric=True, targets=("*",)),
    )


def test_shipped_prune_parses() -> None:
    r = Recipe.from_file(PRUNE50)
    assert r.name == "prune-magnitude-50"
    assert r.stages == (MagnitudeConfig(sparsity=0.5, scope=Scope.LAYER, targets=("*",)),)


@pytest.mark.parametrize("path", [W8, PRUNE50], ids=["w8-rtn", "prune-magnitude-50"])
def test_shipped_round_trip(path: Path, tmp_path: Path) -> None:
    r = Recipe.from_file(path)
    d = r.to_dict()
    assert d["name"] == r.name
    assert Recipe.from_dict(d) == r
    again = Recipe.from_file(write(tmp_path / "again.yaml", r.to_yaml()))
    assert again == r


def test_to_dict_names_method_per_stage() -> None:
    r = Recipe.from_dict(
        {"name": "two", "stages": [{"prune": {"sparsity": 0.3}}, {"quantize": None}]}
    )
    d = r.to_dict()
    assert d["stages"][0]["prune"]["method"] == "magnitude"
    assert d["stages"][0]["prune"]["sparsity"] == 0.3
    assert d["stages"][1]["quantize"]["method"] == "rtn"
    assert r.stages == (MagnitudeConfig(sparsity=0.3), RTNConfig())
    assert Recipe.from_dict(d) == r


def test_name_defaults() -> None:
    assert Recipe.from_dict({"stages": [{"quantize": {}}]}).name == "recipe"


def test_missing_file_named(tmp_path: Path) -> None:
    p = tmp_path / "nope.yaml"
    with pytest.raises(RecipeError) as info:
        Recipe.from_file(p)
    assert "not found" in str(info.value)
    assert str(p) in str(info.value)


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    msg, p = recipe_error(tmp_path, "name: x\nstages:\n  - quantize: {bits: 8\n  - prune: {}\n")
    assert str(p) in msg
    assert "malformed YAML" in msg
    assert "line 4" in msg


def test_malformed_yaml_tab_names_line(tmp_path: Path) -> None:
    msg, p = recipe_error(tmp_path, "name: x\nstages:\n\t- quantize: {}\n")
    assert str(p) in msg
    assert "line 3" in msg


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    msg, p = recipe_error(tmp_path, "- quantize: {}\n")
    assert str(p) in msg
    assert "expected a mapping" in msg


def test_unknown_top_level_key_suggests(tmp_path: Path) -> None:
    msg, p = recipe_error(tmp_path, "name: x\nstagse:\n  - quantize: {}\n")
    assert str(p) in msg
    assert "unknown key 'stagse'" in msg
    assert "did you mean 'stages'?" in msg
    assert "allowed: name, stages" in msg


def test_unknown_stage_kind_suggests(tmp_path: Path) -> None:
    msg, p = recipe_error(tmp_path, "name: x\nstages:\n  - quantise: {bits: 8}\n")
    assert str(p) in msg
    assert "stages[0]" in msg
    assert "unknown stage kind 'quantise'" in msg
    assert "did you mean 'quantize'?" in msg


def test_known_but_unavailable_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from slimkit import registry

    # every kind is implemented now: simulate a build without the nas stage
    real = registry.config_class
    monkeypatch.setattr(registry, "config_class", lambda k, m: None if k == "nas" else real(k, m))
    monkeypatch.setattr(registry, "methods", lambda k: [])
    msg, p = recipe_error(tmp_path, "name: x\nstages:\n  - quantize: {}\n  - nas: {}\n")
    assert str(p) in msg
    assert "stages[1]" in msg
    assert "'nas'" in msg
    assert "not available" in msg


def test_nas_without_method_lists_evolution(tmp_path: Path) -> None:
    msg, _ = recipe_error(tmp_path, "name: x\nstages:\n  - nas: {max_params: 10}\n")
    assert "allowed: evolution" in msg


def test_unknown_method_suggests(tmp_path: Path) -> None:
    msg, p = recipe_error(tmp_path, "name: x\nstages:\n  - quantize: {method: rtm}\n")
    assert str(p) in msg
    assert "stages[0].quantize" in msg
    assert "unknown method 'rtm'" in msg
    assert "did you mean 'rtn'?" in msg
    assert "allowed: " in msg and "rtn" in msg.split("allowed: ")[1]


def test_unknown_option_key_names_file_stage_and_key(tmp_path: Path) -> None:
    msg, p = recipe_error(
        tmp_path, "name: x\nstages:\n  - quantize: {}\n  - prune: {sparsty: 0.5}\n"
    )
    assert msg.startswith(f"{p}: stages[1].prune: ")
    assert "unknown key 'sparsty'" in msg
    assert "did you mean 'sparsity'?" in msg


def test_wrong_type_names_file_stage_and_field(tmp_path: Path) -> None:
    msg, p = recipe_error(tmp_path, "name: x\nstages:\n  - quantize: {bits: '8'}\n")
    assert str(p) in msg
    assert "stages[0]" in msg
    assert "bits" in msg
    assert "'8'" in msg
    assert "an integer" in msg


def test_out_of_range_names_file_stage_and_field(tmp_path: Path) -> None:
    msg, p = recipe_error(tmp_path, "name: x\nstages:\n  - prune: {sparsity: 1.0}\n")
    assert str(p) in msg
    assert "stages[0]" in msg
    assert "sparsity" in msg
    assert "1.0" in msg
    assert "[0, 1)" in msg


@pytest.mark.parametrize("stages", ["stages: []\n", "stages:\n", "", "stages: {quantize: {}}\n"])
def test_empty_or_missing_stages(tmp_path: Path, stages: str) -> None:
    msg, p = recipe_error(tmp_path, "name: x\n" + stages)
    assert str(p) in msg
    assert "stages" in msg
    assert "non-empty list" in msg


def test_empty_file(tmp_path: Path) -> None:
    msg, p = recipe_error(tmp_path, "")
    assert str(p) in msg


def test_bad_name(tmp_path: Path) -> None:
    msg, p = recipe_error(tmp_path, "name: ''\nstages:\n  - quantize: {}\n")
    assert str(p) in msg
    assert "name" in msg


def test_stage_with_two_kinds(tmp_path: Path) -> None:
    msg, p = recipe_error(tmp_path, "stages:\n  - {quantize: {}, prune: {}}\n")
    assert str(p) in msg
    assert "stages[0]" in msg
    assert "one-key mapping" in msg


@pytest.mark.parametrize("options", ["rtn", "8", "[bits]"])
def test_stage_options_not_a_mapping(tmp_path: Path, options: str) -> None:
    msg, p = recipe_error(tmp_path, f"name: x\nstages:\n  - quantize: {options}\n")
    assert str(p) in msg
    assert "stages[0]" in msg


def test_errors_from_dict_name_recipe() -> None:
    with pytest.raises(RecipeError, match=r"^recipe: stages\[0\]\.quantize: .*unknown key 'bitz'"):
        Recipe.from_dict({"stages": [{"quantize": {"bitz": 8}}]})
    with pytest.raises(RecipeError, match="expected a mapping"):
        Recipe.from_dict(["quantize"])


def test_as_recipe_accepts_recipe_dict_and_paths() -> None:
    r = Recipe.from_file(W8)
    assert as_recipe(r) is r
    assert as_recipe(r.to_dict()) == r
    assert as_recipe(W8) == r
    assert as_recipe(str(W8)) == r


def test_as_recipe_refuses_other_types() -> None:
    with pytest.raises(RecipeError, match="expected a path, a dict or a Recipe, got int"):
        as_recipe(8)  # type: ignore[arg-type]


def test_as_recipe_missing_path_named(tmp_path: Path) -> None:
    p = tmp_path / "missing.yaml"
    with pytest.raises(RecipeError, match="not found"):
        as_recipe(str(p))


def test_resolve_shipped_name() -> None:
    assert resolve("w8-rtn") == W8
    assert resolve("prune-magnitude-50") == PRUNE50
    assert Recipe.from_file(resolve("w8-rtn")).name == "w8-rtn"


def test_resolve_typo_suggests() -> None:
    with pytest.raises(RecipeError) as info:
        resolve("w8-rtm")
    msg = str(info.value)
    assert "w8-rtm" in msg
    assert "did you mean 'w8-rtn'?" in msg
    assert "shipped recipes:" in msg and "prune-magnitude-50" in msg


def test_resolve_keeps_paths(tmp_path: Path) -> None:
    p = write(tmp_path / "mine.yaml", W8.read_text())
    assert resolve(p) == p
    assert resolve(str(p)) == p
    # a path with a YAML suffix is returned even when absent: from_file names it then
    assert resolve("absent.yaml") == Path("absent.yaml")
