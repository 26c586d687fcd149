"""The hook contract and the plugin manager: specs, validation, order, chaining, blame."""

from __future__ import annotations

import inspect
import re

import pytest
from helpers import DIGITS_SCENARIO

from clsim import hookimpl, hookspecs
from clsim.config import parse_scenario
from clsim.errors import PluginError, PluginRuntimeError
from clsim.plugin_manager import (
    HOOK_NAMES,
    HookRunner,
    available_plugins,
    build_plugin_manager,
    load_plugin_class,
)
from clsim.runner import run_scenario
from clsim.stream import Batch
from clsim.text import source_line

LIFECYCLE = {
    "clsim_setup",
    "clsim_size_stores",
    "clsim_teardown",
    "clsim_before_experience",
    "clsim_train_experience",
    "clsim_after_experience",
    "clsim_plan_experience",
    "clsim_trainable",
    "clsim_before_batch",
    "clsim_inputs",
    "clsim_forward",
    "clsim_task_loss",
    "clsim_loss",
    "clsim_after_backward",
    "clsim_after_update",
    "clsim_after_batch",
    "clsim_predict",
    "clsim_report",
}


def test_every_lifecycle_hook_has_a_spec():
    assert set(HOOK_NAMES) == LIFECYCLE


@pytest.mark.parametrize("name", sorted(LIFECYCLE))
def test_every_spec_documents_each_argument(name):
    spec = getattr(hookspecs, name)
    doc = inspect.getdoc(spec)
    for arg in inspect.signature(spec).parameters:
        assert re.search(rf":param {arg}:", doc), f"{name} does not document {arg}"


def test_first_result_hooks_say_so():
    for name in ("clsim_train_experience", "clsim_predict"):
        assert getattr(hookspecs, name).clsim_spec["firstresult"] is True
        assert "first non-None result" in inspect.getdoc(getattr(hookspecs, name))


def test_builtin_plugins_come_through_the_entry_point_group():
    found = available_plugins()
    for name in ("naive", "joint", "replay"):
        assert found[name].group == "clsim.plugins"
        assert found[name].value.startswith("clsim_plugins.")
        assert found[name].dist.name == "clsim"


class Misspelt:
    def clsim_after_bach(self, batch):
        pass


class ExtraArgument:
    def clsim_after_batch(self, batch, not_in_spec):
        pass


def test_misspelt_hook_is_rejected_with_a_suggestion():
    with pytest.raises(PluginError) as info:
        build_plugin_manager([("typo", Misspelt())])
    message = str(info.value)
    assert "'typo'" in message and "clsim_after_bach" in message
    assert "did you mean 'clsim_after_batch'?" in message


def test_argument_not_in_spec_is_rejected_naming_plugin_and_hook():
    with pytest.raises(PluginError) as info:
        build_plugin_manager([("extra", ExtraArgument())])
    message = str(info.value)
    assert "'extra'" in message and "clsim_after_batch" in message and "not_in_spec" in message


class Recorder:
    """Appends its tag to a shared list in every batch hook it implements."""

    def __init__(self, tag, log):
        self.tag, self.log = tag, log

    def clsim_after_update(self):
        self.log.append(self.tag)


class First(Recorder):
    @hookimpl(tryfirst=True)
    def clsim_after_update(self):
        self.log.append(self.tag)


def test_call_order_is_the_yaml_order_and_tryfirst_overrides():
    log: list[str] = []
    plugins = [("a", Recorder("a", log)), ("b", Recorder("b", log)), ("c", First("c", log))]
    runner = HookRunner(build_plugin_manager(plugins))
    assert runner.order("clsim_after_update") == ["c", "a", "b"]
    runner.call("clsim_after_update", ctx=None, batch=None)
    assert log == ["c", "a", "b"]


class AddOne:
    def clsim_before_batch(self, batch):
        return Batch(batch.x + 1, batch.y)


class Keep:
    def clsim_before_batch(self, batch):
        return None


class Double:
    def clsim_before_batch(self, batch):
        return Batch(batch.x * 2, batch.y)


def test_before_batch_is_chained_in_order():
    import torch

    batch = Batch(torch.tensor([1.0]), torch.tensor([0]))
    for plugins, expected in (
        ([("a", AddOne()), ("k", Keep()), ("d", Double())], 4.0),  # (1 + 1) * 2
        ([("d", Double()), ("k", Keep()), ("a", AddOne())], 3.0),  # 1 * 2 + 1
    ):
        runner = HookRunner(build_plugin_manager(plugins))
        assert runner.chain("clsim_before_batch", "batch", batch).x.item() == expected


class Boom:
    def clsim_after_batch(self, batch):
        self._helper()

    def _helper(self):
        raise ValueError("boom")


def test_a_raising_plugin_is_named_with_hook_and_experience(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "boom_plugin.py").write_text(
        "class Quiet:\n    def clsim_after_batch(self):\n        pass\n"
        "class Boom:\n    def clsim_after_batch(self, batch):\n        self.helper()\n"
        "    def helper(self):\n        raise ValueError('boom')\n"
    )
    text = DIGITS_SCENARIO.replace(
        "plugins: [naive]", "plugins: ['boom_plugin:Quiet', 'boom_plugin:Boom']"
    )
    result = run_scenario(parse_scenario(text), None)
    error = result.outcomes[0].error
    assert error == (  # the innermost line of the plugin's file: in its helper
        "plugin 'Boom' failed in clsim_after_batch (strategy 'naive', experience 0): "
        f"ValueError: boom ({source_line(tmp_path / 'boom_plugin.py', 8)})"
    )


def test_load_plugin_class_errors():
    with pytest.raises(PluginError, match="has no attribute 'Nope'"):
        load_plugin_class("clsim_plugins.naive:Nope")
    with pytest.raises(PluginError, match="must be a class"):
        load_plugin_class("clsim_plugins.naive:annotations")
    with pytest.raises(PluginError, match="did you mean 'replay'"):
        load_plugin_class("replya")


def test_runtime_error_type_and_attributes(tmp_path, monkeypatch):
    runner = HookRunner(build_plugin_manager([("boom", Boom())]))
    with pytest.raises(PluginRuntimeError) as info:
        runner.call("clsim_after_batch", ctx=None, batch=None, logits=None, loss=None)
    assert info.value.plugin_name == "boom" and info.value.hook == "clsim_after_batch"


class BadBatch:
    def clsim_before_batch(self, batch):
        return (batch.x, batch.y)


class BadLoss:
    def clsim_loss(self, logits):
        return logits  # not a scalar


class BadPredict:
    def clsim_predict(self, x):
        return torch.zeros(len(x))  # float, not class ids


class Numbered:
    created = 0

    def __init__(self):
        type(self).created += 1
        self.number = type(self).created

    def clsim_after_experience(self):
        if self.number == 2:
            raise RuntimeError("instance 2")


class TeardownFails:
    def clsim_setup(self):
        raise ValueError("setup broke")

    def clsim_teardown(self):
        raise ValueError("teardown broke too")


class Reporter:
    """Reports what only the end of a run knows: the true boundaries and test sizes."""

    def clsim_report(self, ctx, stream):
        return {"boundaries": list(stream.boundaries()), "seen": list(ctx.seen_classes),
                "tests": [e.n_test for e in stream], "nested": {"ok": [1.5, None, True]}}


class BadReport:
    def clsim_report(self, stream):
        return {"boundaries": stream.boundaries, "fine": 1}  # a bound method, not data


class Wrapper:
    @hookimpl(wrapper=True)
    def clsim_before_batch(self, batch):
        return (yield)


import torch  # noqa: E402  (used by the plugin classes above at call time)


@pytest.fixture
def this_module(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "hook_test_plugins", sys.modules[__name__])
    return "hook_test_plugins"


@pytest.mark.parametrize(
    ("plugin", "message"),
    [
        ("BadBatch", "plugin 'BadBatch' failed in clsim_before_batch (strategy 'naive', "
                     "experience 0): returned a tuple; expected a Batch or None"),
        ("BadLoss", "plugin 'BadLoss' failed in clsim_loss (strategy 'naive', experience 0): "
                    "returned (64, 10); expected a scalar tensor or None"),
        ("BadPredict", "plugin 'BadPredict' failed in clsim_predict (strategy 'naive'): "
                       "returned torch.float32 of shape ("),
    ],
)
def test_malformed_return_values_are_blamed_on_the_plugin(this_module, plugin, message):
    text = DIGITS_SCENARIO.replace("plugins: [naive]", f"plugins: ['{this_module}:{plugin}']")
    error = run_scenario(parse_scenario(text), None).outcomes[0].error
    assert error.startswith(message), error


def test_the_failing_instance_is_named_when_a_plugin_is_listed_twice(this_module):
    """Two instances of one class: only the second raises, and the message names it
    'Numbered#2' (the YAML name of the second instance), not the first."""
    Numbered.created = 0
    text = DIGITS_SCENARIO.replace(
        "plugins: [naive]", f"plugins: ['{this_module}:Numbered', '{this_module}:Numbered']")
    error = run_scenario(parse_scenario(text), None).outcomes[0].error
    assert error.startswith("plugin 'Numbered#2' failed in clsim_after_experience (strategy "
                            "'naive', experience 0): RuntimeError: instance 2"), error


def test_a_failing_teardown_keeps_the_first_error(this_module):
    text = DIGITS_SCENARIO.replace("plugins: [naive]", f"plugins: ['{this_module}:TeardownFails']")
    error = run_scenario(parse_scenario(text), None).outcomes[0].error
    assert "clsim_setup" in error and "setup broke" in error
    assert error.index("setup broke") < error.index("teardown broke too")


def test_wrappers_are_refused():
    with pytest.raises(PluginError, match="declares clsim_before_batch as a wrapper"):
        HookRunner(build_plugin_manager([("w", Wrapper())]))


def test_a_plugin_report_lands_in_the_strategy_metrics(this_module):
    text = DIGITS_SCENARIO.replace("plugins: [naive]",
                                   f"plugins: [naive, '{this_module}:Reporter']")
    outcome = run_scenario(parse_scenario(text), None).outcomes[0]
    assert outcome.error is None
    report = outcome.metrics["plugins"]["Reporter"]
    assert sorted(report["seen"]) == list(range(10)) and len(report["tests"]) == 5
    assert report["boundaries"][0] == 0 and report["boundaries"] == sorted(report["boundaries"])
    assert report["nested"] == {"ok": [1.5, None, True]}


def test_a_report_that_is_not_plain_data_is_blamed_on_the_plugin(this_module):
    text = DIGITS_SCENARIO.replace("plugins: [naive]",
                                   f"plugins: [naive, '{this_module}:BadReport']")
    error = run_scenario(parse_scenario(text), None).outcomes[0].error
    assert error.startswith("plugin 'BadReport' failed in clsim_report (strategy 'naive'): "
                            "the report['boundaries'] is a method; expected plain data"), error
