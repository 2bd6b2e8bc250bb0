import json

import pytest

from openk2 import toolworld


def test_calculator_is_real_and_safe():
    assert toolworld.safe_calculate("(3 + 4) * 5 - 2") == 33
    assert toolworld.safe_calculate("-7 * 6") == -42
    for bad in ["__import__('os')", "2 ** 100", "1 / 2", "a + 1", "3 +"]:
        with pytest.raises(ValueError):
            toolworld.safe_calculate(bad)


def test_execute_tool_reports_errors_as_results():
    atlas = toolworld.build_atlas()
    place = sorted(atlas)[0]
    assert toolworld.execute_tool("get_fact", {"entity": place, "attribute": "capital"}, atlas) == atlas[place]["capital"]
    assert toolworld.execute_tool("get_fact", {"entity": "Nowhere", "attribute": "capital"}, atlas).startswith("error")
    assert toolworld.execute_tool("calculate", {"expression": "1 +"}, atlas).startswith("error")
    assert toolworld.execute_tool("nope", {}, atlas).startswith("error: unknown tool")


def test_splits_are_disjoint_and_deterministic():
    train = toolworld.make_tasks("train", 400)
    held = toolworld.make_tasks("heldout", 100)
    assert train == toolworld.make_tasks("train", 400)
    train_places = {t.arguments["entity"] for t in train if t.tool == "get_fact"}
    held_places = {t.arguments["entity"] for t in held if t.tool == "get_fact"}
    assert train_places and held_places and not (train_places & held_places)
    assert not ({t.question for t in train} & {t.question for t in held})
    for t in train + held:  # every stored result is what the real tool returns
        assert toolworld.execute_tool(t.tool, t.arguments, toolworld.build_atlas()) == t.result


def test_record_shape_is_openai_style():
    rec = toolworld.make_tasks("train", 1)[0].to_record()
    roles = [m["role"] for m in rec["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    call = rec["messages"][2]["tool_calls"][0]
    assert call["id"] == rec["messages"][3]["tool_call_id"]
    assert json.loads(call["function"]["arguments"]) == rec["expected"]["arguments"]


def test_scoring():
    task = toolworld.make_tasks("heldout", 1)[0]
    assert task.tool == "calculate"
    good = [{"name": "calculate", "arguments": json.dumps(task.arguments)}]
    assert toolworld.score_tool_call(task, good, []) == toolworld.CallScore(True, True, True)
    wrong_value = [{"name": "calculate", "arguments": {"expression": "1 + 1"}}]
    assert toolworld.score_tool_call(task, wrong_value, []) == toolworld.CallScore(True, False, True)
    other_tool = [{"name": "get_fact", "arguments": {"entity": "X", "attribute": "capital"}}]
    assert toolworld.score_tool_call(task, other_tool, []) == toolworld.CallScore(True, False, False)
    assert toolworld.score_tool_call(task, [{"name": "calculate", "arguments": "{bad"}], []).well_formed is False
    assert toolworld.score_tool_call(task, good + good, []).well_formed is False
    assert toolworld.score_tool_call(task, good, ["unclosed section"]).well_formed is False
    assert toolworld.score_tool_call(task, [{"name": "launch", "arguments": {}}], []).well_formed is False
