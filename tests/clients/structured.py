"""Structured outputs through the official OpenAI Python client, unchanged: Pydantic
parsing (a strict json_schema), json_object, vLLM's guided_choice and guided_regex
through extra_body, and a streamed answer equal to the whole one. Usage:
structured.py BASE_URL. Exits non-zero with the reason on any mismatch."""

import json
import re
import sys

from openai import OpenAI
from pydantic import BaseModel


class Person(BaseModel):
    name: str
    age: int


def main(base: str) -> None:
    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    model = client.models.list().data[0].id
    ask = [{"role": "user", "content": "Describe a person in JSON."}]

    parsed = client.beta.chat.completions.parse(
        model=model, messages=ask, response_format=Person, temperature=0, max_tokens=64
    )
    person = parsed.choices[0].message.parsed
    assert isinstance(person, Person), parsed
    print("parse:", person)

    whole = client.chat.completions.create(
        model=model,
        messages=ask,
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=64,
    )
    text = whole.choices[0].message.content
    if whole.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict), text
    print("json_object:", text)

    chunks = client.chat.completions.create(
        model=model,
        messages=ask,
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=64,
        stream=True,
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text, (streamed, text)

    choice = client.completions.create(
        model=model,
        prompt="Is the sky blue? Answer:",
        temperature=0,
        max_tokens=8,
        extra_body={"guided_choice": ["yes", "no"]},
    )
    assert choice.choices[0].text in ("yes", "no"), choice
    print("guided_choice:", choice.choices[0].text)

    regex = client.completions.create(
        model=model,
        prompt="A phone number:",
        temperature=0,
        max_tokens=16,
        extra_body={"guided_regex": r"\d{3}-\d{4}"},
    )
    assert re.fullmatch(r"\d{3}-\d{4}", regex.choices[0].text), regex
    print("guided_regex:", regex.choices[0].text)
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1])
