"""The official `openai` client against `loramux serve` (started by run.sh on the tiny
fixture model `tiny` with adapters `a` and `b`, API key `test-key`)."""

import json
import os
from typing import Literal

import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel, ConfigDict, Field

URL = os.environ["LORAMUX_URL"]
KEY = os.environ["LORAMUX_KEY"]
MESSAGES = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def client():
    return OpenAI(base_url=URL, api_key=KEY, max_retries=0, timeout=60)


def chat(client, model, **kw):
    return client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0, **kw)


def test_models_list_base_and_adapters(client):
    models = {m.id: m for m in client.models.list()}
    assert {"tiny", "a", "b"} <= set(models)
    assert models["a"].model_extra["parent"] == "tiny"
    assert models["tiny"].model_extra["parent"] is None
    assert client.models.retrieve("b").id == "b"


def test_chat_non_streaming(client):
    r = chat(client, "tiny")
    assert r.object == "chat.completion"
    assert r.model == "tiny"
    c = r.choices[0]
    assert c.message.role == "assistant"
    assert isinstance(c.message.content, str) and c.message.content
    assert c.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_adapter_selected_by_model(client):
    base = chat(client, "tiny").choices[0].message.content
    a = chat(client, "a")
    b = chat(client, "b")
    assert a.model == "a" and b.model == "b"
    assert len({base, a.choices[0].message.content, b.choices[0].message.content}) > 1
    # Greedy is deterministic per adapter.
    assert chat(client, "a").choices[0].message.content == a.choices[0].message.content


def test_chat_streaming_matches(client):
    for model in ("tiny", "b"):
        full = chat(client, model)
        stream = chat(client, model, stream=True, stream_options={"include_usage": True})
        text, finish, usage = "", None, None
        for chunk in stream:
            assert chunk.object == "chat.completion.chunk"
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                text += c.delta.content or ""
                finish = c.finish_reason or finish
        assert text == full.choices[0].message.content
        assert finish == full.choices[0].finish_reason
        assert usage.completion_tokens == full.usage.completion_tokens
        assert usage.prompt_tokens == full.usage.prompt_tokens


def test_completions_streaming_and_not(client):
    full = client.completions.create(model="a", prompt="once upon a time", max_tokens=10, temperature=0)
    assert full.object == "text_completion"
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 10
    text = "".join(
        c.choices[0].text
        for c in client.completions.create(model="a", prompt="once upon a time", max_tokens=10, temperature=0, stream=True)
        if c.choices
    )
    assert text == full.choices[0].text


def test_logprobs(client):
    r = chat(client, "a", logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    c = client.completions.create(model="b", prompt="abc", max_tokens=4, temperature=0, logprobs=2)
    assert len(c.choices[0].logprobs.tokens) == 4


def test_errors_are_openai_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        chat(client, "no-such-adapter")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=0)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MESSAGES, frequency_penalty=3.0)
    bad = OpenAI(base_url=URL, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    # Still serving.
    assert chat(client, "tiny").choices[0].message.content


def test_sampling_controls(client):
    """The client's own sampling fields and vLLM's (through extra_body) change the output."""
    greedy = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=10, temperature=0).choices[0].text
    root = URL.removesuffix("/").removesuffix("/v1")
    dog = client.post(f"{root}/tokenize", body={"prompt": "dog", "add_special_tokens": False}, cast_to=object)["tokens"][0]
    forced = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=4, temperature=0, logit_bias={str(dog): 100})
    assert forced.choices[0].text == client.post(f"{root}/detokenize", body={"tokens": [dog] * 4}, cast_to=object)["prompt"]
    penalized = client.completions.create(
        model="tiny", prompt="The quick brown fox", max_tokens=10, temperature=0, frequency_penalty=1.5, presence_penalty=0.5,
        extra_body={"repetition_penalty": 1.5, "min_p": 0.1, "min_tokens": 10},
    )
    assert penalized.choices[0].text != greedy and penalized.usage.completion_tokens == 10
    best = client.completions.create(model="tiny", prompt="Once", max_tokens=5, temperature=1.0, seed=1, n=2, best_of=4)
    assert [c.index for c in best.choices] == [0, 1]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MESSAGES, presence_penalty=-2.5)
    assert e.value.body["param"] == "presence_penalty"


# Structured output. Every string, number and list is bounded, and no extra keys are allowed
# (additionalProperties: false, as OpenAI's strict mode wants), so the tiny random model's
# answers are complete JSON well within max_tokens; validity is then checked by pydantic.
class Pet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["cat", "dog"]
    legs: int = Field(ge=0, le=4)


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=120)
    admin: bool
    pet: Pet
    tags: list[bool] = Field(max_length=3)


PERSON_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "person", "schema": Person.model_json_schema(), "strict": True},
}


def test_json_schema_outputs_validate(client):
    for model in ("tiny", "a"):
        r = client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=300, temperature=1.0, seed=3, n=3, response_format=PERSON_FORMAT
        )
        assert len(r.choices) == 3
        for c in r.choices:
            assert c.finish_reason == "stop"
            Person.model_validate_json(c.message.content)
    stream = client.chat.completions.create(
        model="b", messages=MESSAGES, max_tokens=300, temperature=0, response_format=PERSON_FORMAT, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    Person.model_validate_json(text)


def test_parse_with_a_pydantic_model(client):
    for seed in range(3):
        r = client.chat.completions.parse(
            model="tiny", messages=MESSAGES, max_tokens=300, temperature=1.0, seed=seed, response_format=Person
        )
        person = r.choices[0].message.parsed
        assert isinstance(person, Person) and isinstance(person.pet, Pet)
        assert r.choices[0].finish_reason == "stop"


def test_json_object(client):
    r = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=400, temperature=1.0, seed=1, n=4, response_format={"type": "json_object"}
    )
    complete = [c for c in r.choices if c.finish_reason == "stop"]
    assert all(c.message.content.startswith("{") for c in r.choices)
    assert complete, "no json_object answer completed"
    for c in complete:
        assert isinstance(json.loads(c.message.content), dict)


def test_invalid_schema_is_a_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nosuchtype"}}},
        )
    assert e.value.body["param"] == "response_format"
    assert e.value.body["type"] == "invalid_request_error"


def test_auto_routes_by_content(client):
    # Semantic routing (issue #20): run.sh serves copies of the fixture adapters as `weather`
    # and `cooking`, each with a routing.json; "auto" picks by the prompt, and the answer's
    # model and the x-loramux-route header say which. A prompt that is one of an adapter's
    # examples is that adapter's for any embedding (cosine 1 to its own example).
    def ask(text, **kw):
        return client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": text}], max_tokens=4, temperature=0, **kw
        )

    raw = ask("Will it rain in Paris this weekend?")
    assert raw.parse().model == "weather"
    assert raw.headers["x-loramux-route"].startswith("adapter=weather;")
    assert ask("How do I make fluffy pancakes?").parse().model == "cooking"
    chunks = list(ask("How do I make fluffy pancakes?", stream=True).parse())
    assert chunks and all(c.model == "cooking" for c in chunks)
    # /v1/route answers the ranking without generating (no client method: a plain POST).
    ranked = client.post("/route", body={"model": "auto", "messages": [{"role": "user", "content": "Will it rain in Paris this weekend?"}]}, cast_to=object)
    assert [c["model"] for c in ranked["candidates"]] == ["weather", "cooking"] and ranked["fallback"] is False


def test_embeddings(client):
    r = client.embeddings.create(model="tiny", input=["The quick brown fox", "a lazy dog"])
    assert [d.index for d in r.data] == [0, 1] and len(r.data[0].embedding) == 64
    assert abs(sum(x * x for x in r.data[0].embedding) - 1.0) < 1e-4
    assert r.usage.prompt_tokens > 0
    floats = client.embeddings.create(model="tiny", input="The quick brown fox", encoding_format="float")
    assert all(abs(x - y) < 1e-6 for x, y in zip(floats.data[0].embedding, r.data[0].embedding))
    # An adapter's vectors: batched through the engine with its LoRA, not the base's.
    adapter = client.embeddings.create(model="a", input=["The quick brown fox", "a lazy dog"])
    assert adapter.model == "a" and len(adapter.data) == 2
    assert abs(sum(x * x for x in adapter.data[0].embedding) - 1.0) < 1e-4
    assert max(abs(x - y) for x, y in zip(adapter.data[0].embedding, floats.data[0].embedding)) > 1e-3
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")


SMOLLM2 = os.environ.get("LORAMUX_SMOLLM2_URL")
smollm2_only = pytest.mark.skipif(not SMOLLM2, reason="SmolLM2 is not cached (loramux models pull smollm2-135m)")
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def get_weather(city):
    return {"city": city, "weather": "sunny", "celsius": 21}


@pytest.fixture(scope="module")
def smollm2():
    return OpenAI(base_url=SMOLLM2, api_key=KEY, max_retries=0, timeout=120)


@smollm2_only
def test_tool_calling_flow_on_smollm2(smollm2):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = smollm2.chat.completions.create(
        model="smollm2", messages=messages, tools=[WEATHER], tool_choice="required", max_tokens=60, temperature=0
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    result = get_weather(**json.loads(call.function.arguments))
    # The official flow: the assistant message as returned, then the tool's result.
    messages.append(choice.message)
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
    final = smollm2.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER], max_tokens=40, temperature=0)
    answer = final.choices[0].message
    assert isinstance(answer.content, str) and answer.content.strip(), answer


@smollm2_only
def test_named_tool_streamed_on_smollm2(smollm2):
    stream = smollm2.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=60,
        temperature=0,
        stream=True,
    )
    calls, finish = {}, None
    for chunk in stream:
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for t in c.delta.tool_calls or []:
                calls.setdefault(t.index, {"name": "", "arguments": ""})
                calls[t.index]["name"] += t.function.name or ""
                calls[t.index]["arguments"] += t.function.arguments or ""
    assert finish == "tool_calls"
    assert calls[0]["name"] == "get_weather"
    assert isinstance(json.loads(calls[0]["arguments"])["city"], str)


QWEN = os.environ.get("LORAMUX_QWEN_URL")


@pytest.mark.skipif(not QWEN, reason="Qwen2.5-Coder is not cached (loramux models pull qwen2.5-coder-0.5b)")
def test_tool_calling_flow_on_qwen_with_auto():
    # Qwen2.5's template reads `tools` itself, and the model writes <tool_call> blocks unforced.
    qwen = OpenAI(base_url=QWEN, api_key=KEY, max_retries=0, timeout=300)
    messages = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]
    r = qwen.chat.completions.create(model="qwen", messages=messages, tools=[WEATHER], max_tokens=60, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    result = get_weather(**json.loads(call.function.arguments))
    messages.append(choice.message)
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
    final = qwen.chat.completions.create(model="qwen", messages=messages, tools=[WEATHER], max_tokens=40, temperature=0)
    assert isinstance(final.choices[0].message.content, str) and final.choices[0].message.content.strip()
    # Streamed: the call arrives as a tool_calls delta, parsed once the model closed it.
    stream = qwen.chat.completions.create(model="qwen", messages=messages[:1], tools=[WEATHER], max_tokens=60, temperature=0, stream=True)
    calls, finish = [], None
    for chunk in stream:
        for c in chunk.choices:
            finish = c.finish_reason or finish
            calls += c.delta.tool_calls or []
    assert finish == "tool_calls" and calls[0].index == 0
    assert (calls[0].function.name, calls[0].function.arguments) == (call.function.name, call.function.arguments)


def test_responses_create(client):
    r = client.responses.create(model="tiny", input="hello there", instructions="Be brief.", max_output_tokens=8, temperature=0)
    assert r.object == "response" and r.id.startswith("resp")
    assert r.status in ("completed", "incomplete")
    assert isinstance(r.output_text, str) and r.output_text
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 8
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
    chat_text = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0).choices[0].message.content
    assert r.output_text == chat_text
    listed = client.responses.create(
        model="a", input=[{"role": "user", "content": [{"type": "input_text", "text": "hello there"}]}], max_output_tokens=4
    )
    assert listed.model == "a" and listed.output[0].content[0].type == "output_text"


def test_responses_stream(client):
    whole = client.responses.create(model="tiny", input="hello there", max_output_tokens=8, temperature=0)
    kinds, text, final = [], "", None
    for event in client.responses.create(model="tiny", input="hello there", max_output_tokens=8, temperature=0, stream=True):
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
        if event.type in ("response.completed", "response.incomplete"):
            final = event.response
    assert kinds[0] == "response.created" and "response.output_text.done" in kinds
    assert text == whole.output_text == final.output_text


def test_responses_json_schema_and_stateless_refusals(client):
    schema = {"type": "object", "properties": {"pet": {"enum": ["cat", "dog"]}}, "required": ["pet"], "additionalProperties": False}
    r = client.responses.create(
        model="tiny", input="A pet?", max_output_tokens=100, text={"format": {"type": "json_schema", "name": "pet", "schema": schema, "strict": True}}
    )
    assert json.loads(r.output_text)["pet"] in ("cat", "dog")
    for kw, param in (({"store": True}, "store"), ({"previous_response_id": "resp_1"}, "previous_response_id")):
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model="tiny", input="x", **kw)
        assert e.value.body["param"] == param
