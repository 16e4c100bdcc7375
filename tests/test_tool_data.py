"""OpenAI chat data beyond plain turns (issue 16, points 4 and 5): tool calls, tool results and
tool schemas through the chat template's own tool support, and per-message `weight`."""
from __future__ import annotations

import pytest

import tunelab
from tiny import chat_rows
from test_user_data import setup_line, user_cfg, write_jsonl
from tunelab.data import DataConfig


# ---- 4. OpenAI tool calls train through the chat template's own tool support

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}


def tool_row(content="Let me check.", arguments='{"city": "Paris"}') -> dict:
    return {"tools": [WEATHER], "messages": [
        {"role": "system", "content": "You can call tools."},
        {"role": "user", "content": "How warm is Paris?"},
        {"role": "assistant", "content": content,
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21}'},
        {"role": "assistant", "content": "It is 21 degrees."}]}


def trained_text(ex, tok) -> str:
    from tunelab.data import IGNORE
    return tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])


@pytest.mark.parametrize("content", ["Let me check.", None])
def test_tool_calls_and_results_render_through_the_template_and_calls_train(content, tmp_path):
    from tiny import CHATML_TOOLS, tiny_tokenizer
    from tunelab.data import encode, load_records

    tok = tiny_tokenizer(CHATML_TOOLS)
    path = write_jsonl(tmp_path / "tools.jsonl", [tool_row(content)])
    records = load_records(str(path), DataConfig())
    ex = encode(records, tok, DataConfig())[0]
    text = tok.decode(ex.input_ids)
    assert '"name": "get_weather"' in text and '{"celsius": 21}' in text  # schema, call, result rendered
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>'
    said = "Let me check." if content else ""
    assert trained_text(ex, tok) == said + call + "It is 21 degrees.<|im_end|>"  # the result is not trained


def test_a_template_without_tool_support_is_a_clear_error_naming_the_row(tmp_path):
    from tiny import tiny_tokenizer
    from tunelab.data import encode, load_records
    from tunelab.errors import DataError

    path = write_jsonl(tmp_path / "tools.jsonl", [chat_rows(1)[0], tool_row()])
    records = load_records(str(path), DataConfig())
    with pytest.raises(DataError, match=rf"{path}:2: field 'messages\[2\].tool_calls': the chat template "
                                        "does not render tool calls"):
        encode(records, tiny_tokenizer(), DataConfig())


@pytest.mark.parametrize("edit, field, fragment", [
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments="{city: Paris"),
     "messages[2].tool_calls[0].function.arguments", "not valid JSON"),
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].pop("name"),
     "messages[2].tool_calls[0].function.name", "missing field"),
    (lambda r: r["messages"][2].update(content=None, tool_calls=None), "messages[2].content", "missing field"),
    (lambda r: r["messages"].pop(2), "messages[2].role", "a tool turn must follow an assistant turn with tool_calls"),
    (lambda r: r.update(tools="get_weather"), "tools", "expected a list"),
])
def test_malformed_tool_rows_name_their_field(edit, field, fragment, tmp_path):
    from tunelab.data import load_records
    from tunelab.errors import DataError

    row = tool_row()
    edit(row)
    path = write_jsonl(tmp_path / "tools.jsonl", [row])
    with pytest.raises(DataError, match=rf"{path}:1: field '{__import__('re').escape(field)}': .*{fragment}"):
        load_records(str(path), DataConfig())


def test_a_run_trains_on_tool_calls(tmp_path):
    from tiny import CHATML_TOOLS, tiny_model, tiny_tokenizer

    model_dir = tmp_path / "tool-model"
    tiny_model().save_pretrained(model_dir)
    tiny_tokenizer(CHATML_TOOLS).save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "tools.jsonl", [tool_row()] * 8)
    run = tunelab.train(user_cfg(model_dir, data, tmp_path / "run", eval_fraction=0, max_length=256))
    assert setup_line(run)["train_examples"] == 8 and (run / "final" / "adapter_model.safetensors").exists()


# ---- 5. per-message `weight` (OpenAI fine-tuning format)

def test_an_assistant_turn_with_weight_0_does_not_train(tok, tmp_path):
    from tunelab.data import encode, load_records

    msgs = [{"role": "user", "content": "What is 2 plus 2?"},
            {"role": "assistant", "content": "5", "weight": 0},
            {"role": "user", "content": "Wrong, again?"},
            {"role": "assistant", "content": "4", "weight": 1}]
    path = write_jsonl(tmp_path / "w.jsonl", [{"messages": msgs}, {"messages": msgs[:2]}])
    records = load_records(str(path), DataConfig())
    examples = encode(records, tok, DataConfig())
    assert trained_text(examples[0], tok) == "4<|im_end|>"
    assert len(examples) == 1 and examples.num_dropped == 1  # nothing left to train in the second row


@pytest.mark.parametrize("message, field", [
    ({"role": "assistant", "content": "4", "weight": 2}, "messages[1].weight"),
    ({"role": "assistant", "content": "4", "weight": "0"}, "messages[1].weight"),
])
def test_a_bad_weight_names_its_field(message, field, tmp_path):
    from tunelab.data import load_records
    from tunelab.errors import DataError

    path = write_jsonl(tmp_path / "w.jsonl", [{"messages": [{"role": "user", "content": "q"}, message]}])
    with pytest.raises(DataError, match=rf"field '{field.replace('[', '.').replace(']', '.')}': must be 0 or 1"):
        load_records(str(path), DataConfig())


def test_weight_on_a_user_turn_is_refused(tmp_path):
    from tunelab.data import load_records
    from tunelab.errors import DataError

    row = {"messages": [{"role": "user", "content": "q", "weight": 0}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(DataError, match=r"messages.0..weight': only assistant turns have a weight"):
        load_records(str(write_jsonl(tmp_path / "w.jsonl", [row])), DataConfig())
