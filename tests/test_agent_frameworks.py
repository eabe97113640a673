"""Agent frameworks run unchanged through turngate, each with its own tool decorator: the OpenAI
Agents SDK (its chat-completions model) and LangChain (ChatOpenAI with bound tools), against the
fake upstream, in rank and passthrough mode, JSON and streamed. Each loop calls a function tool,
gets its result back to the actor, and ends with a text answer; the usage details the upstream
reported (cached and reasoning tokens) reach the framework's own usage accounting, every call the
turn billed (a rank turn's candidates too).

The packages are in the `dev` extra; the tests skip where they are not installed.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from service.demo.fake_actor import Reply, assistant
from tests.conftest import TableCritic

agents = pytest.importorskip("agents")
langchain_openai = pytest.importorskip("langchain_openai")

USAGE = {"prompt_tokens": 300, "completion_tokens": 40, "total_tokens": 340,
         "prompt_tokens_details": {"cached_tokens": 128, "audio_tokens": 0},
         "completion_tokens_details": {"reasoning_tokens": 16, "audio_tokens": 0,
                                       "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}
ROUTES: list[dict[str, Any]] = [{"mode": "rank", "candidates": 2}, {"mode": "passthrough"}]


def calls(route: dict[str, Any]) -> int:
    """Upstream calls per turn: what a turn's usage counts."""
    return route["candidates"] if route["mode"] == "rank" else 1


def weather_agent_actor(body, attempt) -> Reply:
    """Calls get_weather first; once the tool's result is in, answers with it."""
    last = body["messages"][-1]
    if last["role"] == "tool":
        return Reply([assistant(f"It is {json.loads(last['content'])['sky']} in Paris.")], usage=USAGE)
    return Reply([assistant(tool_calls=[("get_weather", {"city": "Paris"})])], usage=USAGE)


def sky_of(city: str) -> dict:
    return {"city": city, "sky": "sunny" if city == "Paris" else "unknown"}


def tool_results(requests: list[dict]) -> list[dict]:
    return [json.loads(m["content"]) for r in requests for m in r["messages"] if m["role"] == "tool"]


@pytest.mark.parametrize("route", ROUTES, ids=[r["mode"] for r in ROUTES])
@pytest.mark.parametrize("streamed", [False, True], ids=["run", "run_streamed"])
async def test_openai_agents_sdk_loop(gateway, scripted, actor, route, streamed):
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, RunConfig, Runner, function_tool

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return json.dumps(sky_of(city))

    scripted.fn = weather_agent_actor
    with gateway(critic=TableCritic({}), **route) as (url, sink):
        client = openai.AsyncOpenAI(base_url=url, api_key="sk-test", max_retries=0)
        agent = Agent(name="weather", instructions="Answer with the weather.", tools=[get_weather],
                      model=OpenAIChatCompletionsModel(model="gpt-test", openai_client=client),
                      model_settings=ModelSettings(include_usage=True))
        config = RunConfig(tracing_disabled=True)
        if streamed:
            run = Runner.run_streamed(agent, "What is the weather in Paris?", run_config=config)
            async for _ in run.stream_events():
                pass
            result = run
        else:
            result = await Runner.run(agent, "What is the weather in Paris?", run_config=config)
        await client.close()
    assert result.final_output == "It is sunny in Paris."
    assert tool_results(actor[0].requests) and tool_results(actor[0].requests)[0] == sky_of("Paris")
    usage = result.context_wrapper.usage
    assert usage.requests == 2
    assert usage.input_tokens_details.cached_tokens == 2 * 128 * calls(route)  # turngate used to report 0
    assert usage.output_tokens_details.reasoning_tokens == 2 * 16 * calls(route)
    assert usage.input_tokens == 2 * 300 * calls(route)
    assert [r.decision for r in sink.records] == (["ranked"] * 2 if route["mode"] == "rank" else ["passthrough"] * 2)


@pytest.mark.parametrize("route", ROUTES, ids=[r["mode"] for r in ROUTES])
@pytest.mark.parametrize("streamed", [False, True], ids=["invoke", "stream"])
def test_langchain_tool_loop(gateway, scripted, actor, route, streamed):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> dict:
        """The weather in a city."""
        return sky_of(city)

    scripted.fn = weather_agent_actor
    with gateway(critic=TableCritic({}), **route) as (url, sink):
        llm = langchain_openai.ChatOpenAI(model="gpt-test", base_url=url, api_key="sk-test", max_retries=0,
                                          stream_usage=True).bind_tools([get_weather])

        def ask(messages):
            if not streamed:
                return llm.invoke(messages)
            chunks = list(llm.stream(messages))
            whole = chunks[0]
            for c in chunks[1:]:
                whole += c
            return whole

        messages = [HumanMessage("What is the weather in Paris?")]
        first = ask(messages)
        assert [c["name"] for c in first.tool_calls] == ["get_weather"]
        messages += [first] + [ToolMessage(json.dumps(get_weather.invoke(c["args"])), tool_call_id=c["id"])
                               for c in first.tool_calls]
        answer = ask(messages)
    assert answer.content == "It is sunny in Paris." and not answer.tool_calls
    assert tool_results(actor[0].requests)[0] == sky_of("Paris")
    assert answer.usage_metadata["input_token_details"]["cache_read"] == 128 * calls(route)
    assert answer.usage_metadata["output_token_details"]["reasoning"] == 16 * calls(route)
    assert answer.usage_metadata["total_tokens"] == 340 * calls(route)
    assert len(sink.records) == 2
