"""Module selection: globs, ``re:`` regexes, ignore patterns, exact types, set_module."""

import pytest
import torch
from torch import nn

from slimkit.errors import SelectionError
from slimkit.select import check_patterns, matches, select, set_module

LINEAR = (nn.Linear,)


class MyLinear(nn.Linear):
    pass


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(4, 4)
        self.k = nn.Linear(4, 4)
        self.mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(4, 2)
        self.conv = nn.Conv2d(1, 1, 1)
        self.custom = MyLinear(4, 4)
        self.attn = nn.MultiheadAttention(4, 2)


@pytest.fixture
def model() -> Model:
    torch.manual_seed(0)
    return Model()


def test_matches_glob_and_regex() -> None:
    assert matches("blocks.0.q", "blocks.*.q")
    assert matches("blocks.0.mlp.0", "blocks.*")  # '*' crosses dots
    assert not matches("head", "blocks.*")
    assert matches("blocks.10.q", "re:blocks\\.\\d+\\.q")
    # regexes must match the whole name
    assert not matches("blocks.0.qq", "re:blocks\\.\\d+\\.q")
    assert not matches("xblocks.0.q", "re:blocks\\.\\d+\\.q")
    assert matches("Head", "Head") and not matches("head", "Head")  # case-sensitive


def test_star_selects_all_exact_linears(model: Model) -> None:
    names = select(model, ["*"], [], LINEAR)
    expected = [f"blocks.{i}.{n}" for i in (0, 1) for n in ("q", "k", "mlp.0", "mlp.2")]
    assert names == [*expected, "head"]


def test_subclass_and_mha_out_proj_not_selected(model: Model) -> None:
    names = select(model, ["*"], [], LINEAR)
    assert "custom" not in names
    assert "attn.out_proj" not in names
    assert isinstance(model.attn.out_proj, nn.Linear)  # it is a Linear subclass


def test_pattern_matching_only_subclasses_raises(model: Model) -> None:
    with pytest.raises(SelectionError, match=r"'attn\.out_proj'"):
        select(model, ["attn.out_proj"], [], LINEAR)
    with pytest.raises(SelectionError, match="'custom'"):
        select(model, ["custom"], [], LINEAR)


def test_glob_targets(model: Model) -> None:
    assert select(model, ["blocks.*.q", "head"], [], LINEAR) == ["blocks.0.q", "blocks.1.q", "head"]
    assert select(model, ["blocks.1.mlp.?"], [], LINEAR) == ["blocks.1.mlp.0", "blocks.1.mlp.2"]


def test_regex_targets_fullmatch(model: Model) -> None:
    assert select(model, ["re:blocks\\.\\d\\.(q|k)"], [], LINEAR) == [
        "blocks.0.q",
        "blocks.0.k",
        "blocks.1.q",
        "blocks.1.k",
    ]
    # 're:blocks' alone matches no full name
    with pytest.raises(SelectionError, match="re:blocks"):
        select(model, ["re:blocks"], [], LINEAR)


def test_ignore_patterns(model: Model) -> None:
    names = select(model, ["*"], ["blocks.0.*", "re:.*mlp\\.2"], LINEAR)
    assert names == ["blocks.1.q", "blocks.1.k", "blocks.1.mlp.0", "head"]


def test_ignore_matching_nothing_is_fine(model: Model) -> None:
    assert select(model, ["head"], ["nothing"], LINEAR) == ["head"]


def test_ignore_everything_gives_empty(model: Model) -> None:
    assert select(model, ["head"], ["head"], LINEAR) == []


def test_types_restrict(model: Model) -> None:
    assert select(model, ["*"], [], (nn.Conv2d,)) == ["conv"]
    assert select(model, ["*"], [], (nn.Conv2d, nn.Linear))[-1] == "conv"


def test_unmatched_target_names_pattern_and_candidates(model: Model) -> None:
    with pytest.raises(SelectionError) as info:
        select(model, ["head", "decoder.*"], [], LINEAR)
    msg = str(info.value)
    assert "'decoder.*'" in msg
    assert "Linear" in msg
    assert "blocks.0.q" in msg  # a few candidate names to help


def test_unmatched_target_model_without_type(model: Model) -> None:
    with pytest.raises(
        SelectionError, match=r"'\*' matches no Embedding module \(the model has none\)"
    ):
        select(model, ["*"], [], (nn.Embedding,))


def test_selection_error_is_value_error() -> None:
    with pytest.raises(ValueError):
        select(nn.Sequential(nn.ReLU()), ["*"], [], LINEAR)


def test_check_patterns() -> None:
    check_patterns("f", ["*", "re:a|b", "[abc]"])  # valid: no error
    with pytest.raises(ValueError, match=r"f: bad regex 're:a\('"):
        check_patterns("f", ["ok", "re:a("])


def test_set_module_nested(model: Model) -> None:
    new = nn.Identity()
    set_module(model, "blocks.1.mlp.2", new)
    assert model.blocks[1].mlp[2] is new
    assert model.get_submodule("blocks.1.mlp.2") is new
    assert isinstance(model.blocks[0].mlp[2], nn.Linear)  # the other block untouched


def test_set_module_top_level(model: Model) -> None:
    new = nn.Linear(4, 3)
    set_module(model, "head", new)
    assert model.head is new
    assert dict(model.named_modules())["head"] is new


def test_set_module_missing_parent(model: Model) -> None:
    with pytest.raises(AttributeError):
        set_module(model, "nothing.here", nn.Identity())


def test_children_of_compressed_layers_are_never_selected() -> None:
    from slimkit.compressed import CompressedModule

    class Twin(CompressedModule):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = nn.Linear(4, 2), nn.Linear(2, 4)

    model = nn.Sequential(Twin(), nn.Linear(4, 4))
    assert select(model, ["*"], [], LINEAR) == ["1"]
    with pytest.raises(SelectionError, match=r"0\.first"):
        select(model, ["0.first"], [], LINEAR)
    assert select(model, ["*"], [], (Twin,)) == ["0"]
