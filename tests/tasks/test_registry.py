from __future__ import annotations

import subprocess
import sys

import pytest

from slimkit import tasks
from slimkit.errors import SlimkitError, TaskError
from slimkit.tasks.digits import DigitsLeNet, DigitsMLP

BUILTIN = {
    "digits-lenet", "digits-mlp", "digits-resnet", "minilm-topics", "hf", "smollm2", "hf-causal"
}  # fmt: skip


def test_names_lists_the_builtin_tasks_sorted():
    assert set(tasks.names()) == BUILTIN
    assert tasks.names() == sorted(tasks.names())


def test_describe_pairs_each_name_with_a_one_line_description():
    pairs = tasks.describe()
    assert [name for name, _ in pairs] == tasks.names()
    for _, description in pairs:
        assert description.strip() and "\n" not in description


def test_get_builds_a_fresh_instance_of_the_named_task():
    first, second = tasks.get("digits-lenet"), tasks.get("digits-lenet")
    assert isinstance(first, DigitsLeNet) and first is not second
    assert isinstance(tasks.get("digits-mlp"), DigitsMLP)


def test_unknown_name_suggests_the_closest_and_lists_all():
    with pytest.raises(TaskError) as info:
        tasks.get("digits-lenat")
    message = str(info.value)
    assert "did you mean 'digits-lenet'" in message
    assert all(name in message for name in BUILTIN)
    assert "\n" not in message and not message.startswith('"')
    assert isinstance(info.value, SlimkitError)


def test_unknown_name_without_a_close_match_has_no_suggestion():
    with pytest.raises(TaskError) as info:
        tasks.get("zzzz")
    assert "did you mean" not in str(info.value)


def test_wrong_arguments_are_a_task_error_not_a_type_error():
    with pytest.raises(TaskError, match="model_dir"):
        tasks.get("hf")
    with pytest.raises(TaskError, match="no arguments"):
        tasks.get("digits-mlp", model_dir="x")


@pytest.mark.parametrize("name", ["digits-lenet", "digits-mlp"])
def test_source_round_trips_through_from_source(name):
    task = tasks.get(name)
    assert task.source() == {"task": name}
    assert type(tasks.from_source(task.source())) is type(task)


@pytest.mark.parametrize("source", [{}, {"task": 3}, "digits-lenet", {"model_dir": "x"}])
def test_from_source_rejects_what_is_not_a_source(source):
    with pytest.raises(TaskError, match="not a task source"):
        tasks.from_source(source)


def test_from_source_with_an_unknown_task_names_it():
    with pytest.raises(TaskError, match="unknown task 'gone'"):
        tasks.from_source({"task": "gone"})


def test_importing_the_registry_does_not_import_transformers_or_sklearn():
    code = (
        "import sys, slimkit.tasks as t; t.names(); t.describe(); t.get('digits-lenet');"
        "bad = [m for m in ('transformers', 'sklearn') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
