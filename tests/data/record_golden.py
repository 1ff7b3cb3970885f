#!/usr/bin/env python3
"""Records tests/data/golden_responses.json: the responses of a running lynx-host to
tests/data/golden_requests.json, whole and streamed, with the per-response random parts
(id, created) removed. It was recorded from the pre-plugin host (commit 6a817e8), which
tests/tests/golden.rs holds the plugin host to, byte for byte.

    python3 tests/data/record_golden.py http://127.0.0.1:8000
"""
import json
import pathlib
import sys
import urllib.error
import urllib.request

here = pathlib.Path(__file__).parent
base = sys.argv[1]


def post(path, body):
    req = urllib.request.Request(base + path, json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def scrub(value):
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if k not in ("id", "created")}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def counters():
    """request_total, tokens_total and the TTFT count, by their labels."""
    with urllib.request.urlopen(base + "/metrics") as r:
        text = r.read().decode()
    found = {}
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in ("request_total", "tokens_total", "time_to_first_token_seconds_count"):
            key, value = line.rsplit(" ", 1)
            if 'endpoint="/metrics"' not in key:
                found[key] = float(value)
    return found


before = counters()
out = []
for case in json.load(open(here / "golden_requests.json")):
    status, text = post(case["path"], case["body"])
    whole = scrub(json.loads(text))
    stream_body = dict(case["body"], stream=True, stream_options={"include_usage": True})
    s_status, s_text = post(case["path"], stream_body)
    events = [line[len("data: "):] for line in s_text.splitlines() if line.startswith("data: ")]
    events = [e if e == "[DONE]" else scrub(json.loads(e)) for e in events]
    if s_status != 200:
        events = scrub(json.loads(s_text))
    out.append({"status": status, "body": whole, "stream_status": s_status, "stream": events})
after = counters()
metrics = {k: v - before.get(k, 0.0) for k, v in sorted(after.items()) if v != before.get(k, 0.0)}
json.dump({"responses": out, "metrics": metrics},
          open(here / "golden_responses.json", "w"), indent=1, ensure_ascii=False)
print(f"recorded {len(out)} cases")
