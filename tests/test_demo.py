"""`turngate demo` runs recorded τ-bench turns through the real gate and client."""

from service.demo.run import run_demo


def test_demo_runs_every_turn_and_never_returns_the_broken_candidate():
    lines: list[str] = []
    rows = run_demo(4, print_fn=lines.append)
    assert len(rows) == 4
    assert all(r["decision"] in {"ranked", "all_vetoed"} for r in rows)
    assert not any(r["chosen_synthetic"] for r in rows)  # its arguments are cut-off JSON: vetoed
    assert sum("bad_json" in line for line in lines) == 4


def test_the_fake_upstream_caps_top_logprobs_as_openai_does(actor):
    """OpenAI takes top_logprobs up to 20; the demo upstream built one alternative per unit asked,
    so top_logprobs=10**20 never answered."""
    import openai

    client = openai.OpenAI(base_url=actor[1], api_key="sk-test", max_retries=0, timeout=10)
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                           logprobs=True, top_logprobs=10 ** 20)
    tokens = reply.choices[0].logprobs.content
    assert tokens and all(len(t.top_logprobs) == 20 for t in tokens)
