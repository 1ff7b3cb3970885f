"""The OpenAI API fields beyond the basics, read through the official OpenAI Python
client's own typed models, unchanged: log-probabilities on completions (with echo) and
chat (streamed too), n choices, cached prompt tokens, penalties and logit_bias, and
vLLM's extras through extra_body. Usage: parity.py BASE_URL. Exits non-zero with the
reason on any mismatch."""

import sys

from openai import OpenAI
from openai.types import Completion, CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionTokenLogprob
from openai.types.completion_choice import Logprobs
from openai.types.completion_usage import PromptTokensDetails


def main(base: str) -> None:
    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    model = client.models.list().data[0].id

    # Completions: logprobs 2, in the legacy shape, as typed fields.
    c = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=2
    )
    assert isinstance(c, Completion), c
    lp = c.choices[0].logprobs
    assert isinstance(lp, Logprobs), lp
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6, lp
    assert len(lp.text_offset) == 6 and lp.text_offset[0] == 0, lp
    assert "".join(lp.tokens) == c.choices[0].text, (lp.tokens, c.choices[0].text)
    assert all(isinstance(t, dict) and 1 <= len(t) <= 2 for t in lp.top_logprobs), lp
    assert all(v <= 0 for v in lp.token_logprobs), lp
    print("completion logprobs:", lp.tokens)

    # Echo: the prompt and its scores first; the first token has none.
    e = client.completions.create(
        model=model,
        prompt="The capital of France is",
        max_tokens=0,
        temperature=0,
        logprobs=1,
        echo=True,
    )
    elp = e.choices[0].logprobs
    assert e.choices[0].text == "The capital of France is", e
    assert elp.token_logprobs[0] is None and all(v is not None for v in elp.token_logprobs[1:]), elp
    assert e.usage.completion_tokens == 0, e.usage
    print("echo:", elp.token_logprobs)

    # Chat: logprobs true with top_logprobs 3, content[] typed.
    ask = [{"role": "user", "content": "Name a fruit."}]
    r = client.chat.completions.create(
        model=model, messages=ask, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    assert isinstance(r, ChatCompletion), r
    content = r.choices[0].logprobs.content
    assert content and all(isinstance(t, ChatCompletionTokenLogprob) for t in content), r
    assert "".join(t.token for t in content) == r.choices[0].message.content, content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == t.logprob, t
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token, t
    print("chat logprobs:", [t.token for t in content])

    # Streamed chat logprobs add up to the whole answer's.
    chunks = client.chat.completions.create(
        model=model,
        messages=ask,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        stream=True,
    )
    streamed = [
        t.logprob
        for ch in chunks
        if ch.choices and ch.choices[0].logprobs and ch.choices[0].logprobs.content
        for t in ch.choices[0].logprobs.content
    ]
    assert streamed == [t.logprob for t in content], (streamed, content)

    # n choices: each its own index; a seed reproduces them.
    def choices():
        r = client.chat.completions.create(
            model=model, messages=ask, max_tokens=8, temperature=1.0, seed=3, n=3
        )
        assert [c.index for c in r.choices] == [0, 1, 2], r
        return [c.message.content for c in r.choices]

    first = choices()
    assert first == choices(), first
    assert len(set(first)) > 1, first
    print("n=3:", first)

    # Cached prompt tokens, in usage.prompt_tokens_details: the prefix cache shares
    # only within a cache_salt by default (vLLM's field, through extra_body).
    system = "You are a harbour guide. " * 60
    long = [{"role": "system", "content": system}, {"role": "user", "content": "Hello"}]
    usages = [
        client.chat.completions.create(
            model=model, messages=long, max_tokens=2, temperature=0,
            extra_body={"cache_salt": "parity-tenant"},
        ).usage
        for _ in range(2)
    ]
    for u in usages:
        assert isinstance(u, CompletionUsage) and isinstance(u.prompt_tokens_details, PromptTokensDetails), u
    assert usages[1].prompt_tokens_details.cached_tokens > usages[1].prompt_tokens // 2, usages
    print("cached:", [u.prompt_tokens_details.cached_tokens for u in usages])

    # Penalties and bias through the client's own arguments, vLLM's through extra_body.
    plain = client.completions.create(model=model, prompt="One, two,", max_tokens=8, temperature=0)
    shaped = client.completions.create(
        model=model,
        prompt="One, two,",
        max_tokens=8,
        temperature=0,
        presence_penalty=1.5,
        frequency_penalty=1.5,
        logit_bias={"28": -100},
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.3, "min_tokens": 8, "ignore_eos": True},
    )
    assert shaped.usage.completion_tokens == 8, shaped.usage
    assert shaped.choices[0].text != plain.choices[0].text, (shaped, plain)
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1])
