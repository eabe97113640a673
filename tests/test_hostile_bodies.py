"""Hostile request bodies through the real server: each gets a 4xx in OpenAI's error envelope, never a 5xx.

One gateway (client keys and an admin key set) in front of a fake actor serves the whole table. The
actor calls the first declared tool, so a tool schema in a request is really used to check a reply.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from service.app import create_app
from service.demo.fake_actor import FakeActor, Reply, assistant, serve_in_thread
from service.settings import RouteSettings, Settings
from service.store.base import MemorySink
from tests.conftest import TableCritic

CLIENT_KEY = "sk-hostile-client"
ADMIN_KEY = "adm-hostile-7f3a9c"
CHAT, SCORE, ACTIVATE = "/v1/chat/completions", "/v1/critic/score", "/v1/admin/critic/activate"
USER = [{"role": "user", "content": "hi"}]
BIG = "1" * 5000  # past every JSON parser's integer limit


def calls_first_tool(body, attempt) -> Reply:
    tools = body.get("tools") or []
    if tools:
        name = tools[0]["function"]["name"]
        return Reply([assistant(tool_calls=[(name, {"x": "a" * 27 + "!"})])])
    return Reply([assistant("hello")])


def tool(parameters) -> dict:
    return {"type": "function", "function": {"name": "f", "parameters": parameters}}


def chat(**fields) -> bytes:
    return json.dumps({"model": "gpt-test", "messages": USER, **fields}).encode()


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def with_history(message: dict) -> bytes:
    return chat(messages=[*USER, message, {"role": "user", "content": "and?"}])


@dataclass
class Case:
    name: str
    body: bytes | None
    path: str = CHAT
    headers: dict[str, bytes | str] = field(default_factory=dict)
    key: bytes | str | None = None  # the bearer token; None = the right one for the path


def _chat_cases() -> list[Case]:
    raw = [
        ("json nested 100k deep", nested(100_000).encode()),
        ("json nested 100k deep in content",
         b'{"model":"gpt-test","messages":[{"role":"user","content":' + nested(100_000).encode() + b"}]}"),
        ("json nested 100k deep in an unknown field",
         b'{"model":"gpt-test","messages":[{"role":"user","content":"hi"}],"x":' + nested(100_000).encode() + b"}"),
        ("json nested 900 deep in an unknown field",
         b'{"model":"gpt-test","messages":[{"role":"user","content":"hi"}],"x":' + nested(900).encode() + b"}"),
        ("5000-digit max_tokens", chat()[:-1] + b',"max_tokens":' + BIG.encode() + b"}"),
        ("5000-digit temperature", chat()[:-1] + b',"temperature":' + BIG.encode() + b"}"),
        ("5000-digit n", chat()[:-1] + b',"n":' + BIG.encode() + b"}"),
        ("5000-digit unknown field", chat()[:-1] + b',"seed":' + BIG.encode() + b"}"),
        ("5000-digit tool-call arguments",
         b'{"model":"gpt-test","messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"c",'
         b'"type":"function","function":{"name":"f","arguments":' + BIG.encode() + b"}}]}]}"),
        ("5000-digit in a tool schema", chat()[:-1] + b',"tools":[{"type":"function","function":{"name":"f",'
         b'"parameters":{"type":"object","maxProperties":' + BIG.encode() + b"}}}]}"),
        ("float overflow temperature", chat()[:-1] + b',"temperature":1e400}'),
        ("float overflow in content part", (b'{"model":"gpt-test","messages":[{"role":"user","content":'
         b'[{"type":"text","text":"hi","weight":-1e999}]}]}')),
        ("NaN temperature", chat()[:-1] + b',"temperature":NaN}'),
        ("Infinity in an unknown field", chat()[:-1] + b',"x":Infinity}'),
        ("-Infinity in metadata", chat()[:-1] + b',"metadata":{"a":-Infinity}}'),
        ("invalid UTF-8", b'{"model":"gpt-test","messages":[{"role":"user","content":"\xff\xfe"}]}'),
        ("lone surrogate escape", b'{"model":"gpt-test","messages":[{"role":"user","content":"\\ud800"}]}'),
        ("empty body", b""),
        ("truncated JSON", chat()[:-5]),
        ("body is an array", b"[]"),
        ("body is null", b"null"),
        ("body is a string", b'"hello"'),
        ("messages is a string", chat(messages="hi")),
        ("messages is an object", chat(messages={"role": "user", "content": "hi"})),
        ("messages is null", chat(messages=None)),
        ("messages holds numbers", chat(messages=[1, 2])),
        ("messages: 200k numbers", chat(messages=[0] * 200_000)),
        ("message role unknown", chat(messages=[{"role": "wizard", "content": "hi"}])),
        ("content part not an object", chat(messages=[{"role": "user", "content": [5, "x"]}])),
        ("content part text not a string", chat(messages=[{"role": "user", "content": [{"type": "text",
                                                                                            "text": 5}]}])),
        ("content parts: 100k numbers", chat(messages=[{"role": "user", "content": [7] * 100_000}])),
        ("history tool_calls[0].function is a string", with_history(
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
                                                                    "function": "f"}]})),
        ("history tool_calls[0] is a string", with_history(
            {"role": "assistant", "content": None, "tool_calls": ["f"]})),
        ("history tool_calls is an object", with_history(
            {"role": "assistant", "content": None, "tool_calls": {"function": {"name": "f"}}})),
        ("history function.name is a number", with_history(
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
                                                                    "function": {"name": 5, "arguments": "{}"}}]})),
        ("history assistant text part not a string", with_history(
            {"role": "assistant", "content": [{"type": "text", "text": {"a": 1}}]})),
        ("model is a number", json.dumps({"model": 5, "messages": USER}).encode()),
        ("model missing", json.dumps({"messages": USER}).encode()),
        ("stream is a string", chat(stream="no")),
        ("stream is a number", chat(stream=1)),
        ("stream_options is a string", chat(stream_options="x")),
        ("tools is a string", chat(tools="f")),
        ("tools is an object", chat(tools=tool({}))),
        ("tools holds numbers", chat(tools=[1])),
        ("tool without function", chat(tools=[{"type": "function"}])),
        ("tool parameters is a list", chat(tools=[tool([])])),
        ("tools: 100k numbers", chat(tools=[0] * 100_000)),
        ("tool_choice is a number", chat(tool_choice=5)),
        ("tool_choice is a list", chat(tool_choice=[])),
        ("tool_choice is an unknown string", chat(tool_choice="sometimes")),
        ("schema {$ref: #}", chat(tools=[tool({"$ref": "#"})])),
        ("schema recursive allOf", chat(tools=[tool({"allOf": [{"$ref": "#"}]})])),
        ("schema ref cycle through $defs", chat(tools=[tool({
            "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"anyOf": [{"$ref": "#/$defs/a"}]}},
            "type": "object", "properties": {"x": {"$ref": "#/$defs/a"}}})])),
        ("schema nested 1000 deep", b'{"model":"gpt-test","messages":[{"role":"user","content":"hi"}],'
         b'"tools":[{"type":"function","function":{"name":"f","parameters":'
         + b'{"allOf":[' * 1000 + b"{}" + b"]}" * 1000 + b"}}]}"),
    ]
    return [Case(name, body) for name, body in raw]


def _score(**fields) -> bytes:
    return json.dumps({"messages": USER, "candidates": [{"role": "assistant", "content": "x"}], **fields}).encode()


def _other_cases() -> list[Case]:
    cases = [
        Case("non-ASCII bearer token (chat)", chat(), key="ключ".encode()),
        Case("latin-1 bearer token (chat)", chat(), key=b"\xff\xfe"),
        Case("non-ASCII bearer token (admin)", json.dumps({"path": "/tmp"}).encode(), ACTIVATE,
             key="ключ".encode()),
        Case("non-ASCII bearer token (models)", None, "/v1/models", key="ключ".encode()),
        Case("NUL in the admin activate path", json.dumps({"path": "/tmp/a\u0000b"}).encode(), ACTIVATE),
        Case("admin activate path 100k long", json.dumps({"path": "/" + "a" * 100_000}).encode(), ACTIVATE),
        Case("admin activate path with a 300-char name", json.dumps({"path": "/tmp/" + "a" * 300}).encode(), ACTIVATE),
        Case("admin activate path ~unknown-user", json.dumps({"path": "~no-such-user-x/b"}).encode(), ACTIVATE),
        Case("admin activate path is a number", json.dumps({"path": 5}).encode(), ACTIVATE),
        Case("admin activate json nested 100k deep", nested(100_000).encode(), ACTIVATE),
        Case("score: parts not objects", _score(messages=[{"role": "user", "content": [1, 2]}])),
        Case("score: text not a string", _score(messages=[{"role": "user", "content": [{"type": "text",
                                                                                           "text": 5}]}])),
        Case("score: candidate text not a string", _score(candidates=[{"role": "assistant", "content": [
            {"type": "text", "text": ["a"]}]}])),
        Case("score: tool_calls function is a string", _score(candidates=[{
            "role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": "f"}]}])),
        Case("score: tool_calls holds strings", _score(candidates=[{"role": "assistant", "tool_calls": ["f"]}])),
        Case("score: candidates is a string", _score(candidates="x")),
        Case("score: json nested 100k deep", b'{"messages":' + nested(100_000).encode() + b"}"),
        Case("score: json nested 900 deep in content", b'{"messages":[{"role":"user","content":[{"type":"text",'
             b'"text":"hi","x":' + nested(900).encode() + b'}]}],"candidates":[{"role":"assistant","content":"x"}]}'),
        Case("score: 5000-digit number", _score()[:-1] + b',"x":' + BIG.encode() + b"}"),
        Case("score: NaN", _score()[:-1] + b',"x":NaN}'),
        Case("score: invalid UTF-8", b'{"messages":[{"role":"user","content":"\xff"}],"candidates":[]}'),
    ]
    for c in cases:
        if c.name.startswith("score:"):
            c.path = SCORE
    return cases


CASES = [*_chat_cases(), *_other_cases()]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    actor = FakeActor(calls_first_tool)
    with serve_in_thread(actor.app) as actor_url:
        route = RouteSettings(alias="gpt-test", upstream_base_url=actor_url + "/v1", upstream_model="actor",
                              candidates=2, mode="rank", attempt_timeout_s=5, deadline_s=10)
        settings = Settings(routes=[route], api_keys=[CLIENT_KEY], admin_key=ADMIN_KEY)
        app = create_app(settings, critic=TableCritic({}), sink=MemorySink())
        with serve_in_thread(app) as url:
            yield url


def send(url: str, case: Case) -> httpx.Response:
    key = case.key if case.key is not None else (ADMIN_KEY if case.path.startswith("/v1/admin") else CLIENT_KEY)
    key = key.encode() if isinstance(key, str) else key
    headers = {b"authorization": b"Bearer " + key, b"content-type": b"application/json"}
    method = "GET" if case.body is None else "POST"
    return httpx.request(method, url + case.path, content=case.body, headers=headers, timeout=30)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_body_gets_a_4xx_in_the_openai_envelope(server, case):
    resp = send(server, case)
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:300])
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]


def test_a_well_formed_request_with_unknown_fields_still_passes(server):
    body = json.loads(chat(temperature=0.2, x_vendor={"deep": [[[1]]]}, seed=7, max_tokens=50,
                           tools=[tool({"type": "object", "properties": {"x": {"type": "string"}}})]))
    resp = httpx.post(server + CHAT, json=body, headers={"authorization": f"Bearer {CLIENT_KEY}"}, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "f"
