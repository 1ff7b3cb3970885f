"""Tool requests through the official OpenAI Python client, unchanged: until a plugin
serves tool calls, a request that needs them is refused as the client's error (400
`tools_unsupported`, raised as BadRequestError naming the parameter and the plugin),
never answered as plain text with its tools dropped; bad tool fields are 400s naming
the field; `tool_choice="none"` is served as plain chat. Usage: tools.py BASE_URL.
Exits non-zero with the reason on any mismatch."""

import sys

import openai
from openai import OpenAI

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def refused(call, param: str, code: str | None) -> openai.BadRequestError:
    try:
        r = call()
    except openai.BadRequestError as e:
        assert e.status_code == 400, e
        err = e.body
        assert err["param"] == param, (param, err)
        if code is not None:
            assert err["code"] == code, (code, err)
        assert err["type"] == "invalid_request_error", err
        return e
    raise AssertionError(f"served instead of refused ({param}): {r}")


def main(base: str) -> None:
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]

    def chat(**kw):
        return client.chat.completions.create(model=model, messages=ask, max_tokens=8, **kw)

    for choice in ["auto", "required", {"type": "function", "function": {"name": "get_weather"}}]:
        e = refused(lambda: chat(tools=[WEATHER], tool_choice=choice), "tools", "tools_unsupported")
        assert "default" in e.message and "lynx:plugin@" in e.message, e.message
    refused(lambda: chat(tools=[WEATHER]), "tools", "tools_unsupported")
    # Streamed: refused before the stream starts, the same way.
    refused(lambda: chat(tools=[WEATHER], stream=True), "tools", "tools_unsupported")
    print("tool requests: 400 tools_unsupported")

    # A tool turn in the history needs the tools too.
    history = ask + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"},
    ]
    refused(
        lambda: client.chat.completions.create(model=model, messages=history, max_tokens=8),
        "messages[1]",
        "tools_unsupported",
    )

    # Bad fields: the client's fault, named.
    other = {"type": "function", "function": {"name": "other"}}
    refused(lambda: chat(tools=[WEATHER], tool_choice=other), "tool_choice", None)
    refused(lambda: chat(tool_choice="required"), "tool_choice", None)
    bad_schema = {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}
    refused(lambda: chat(tools=[bad_schema]), "tools[0].function.parameters", None)
    refused(lambda: chat(tools=[WEATHER, WEATHER]), "tools[1].function.name", None)
    print("bad tool fields: 400 naming the field")

    # `none`: no call is wanted, so the request is plain chat.
    r = chat(tools=[WEATHER], tool_choice="none", temperature=0)
    assert r.choices[0].message.content, r
    assert not r.choices[0].message.tool_calls, r
    assert r.choices[0].finish_reason in ("stop", "length"), r
    print("tool_choice none: served,", repr(r.choices[0].message.content))
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1])
