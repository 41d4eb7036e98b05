"""The OpenAPI document tells the truth: schemathesis, every check and every phase (what
``schemathesis run --checks all`` does), against a real uvicorn server on the tiny model. A body
the document accepts is accepted; one it rejects is a 400; every answer has a documented
status, content type, headers and body shape; nothing is a 5xx.

Bounded for CI (two cores: about 45 s here, under load): `MAX_EXAMPLES` per operation,
deterministic, and ESS_MAX_NEW_TOKENS_LIMIT=4 (the document says so), so no request generates
more than 4 tokens. No ``max-time``: given one, schemathesis keeps cycling its phases until
that time is spent.

Run through schemathesis' engine rather than its pytest plugin: the engine runs the coverage
phase (boundary values) as the CLI does, and ``schemathesis.pytest.from_fixture`` does not run
under pytest 9.2 (it reads ``Function._nodeid``, which pytest removed).
"""

from __future__ import annotations

import json

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")

from schemathesis import engine as st_engine  # noqa: E402
from schemathesis.engine import Status, StopReason, events  # noqa: E402

from safety_decoding.decode import Decoder  # noqa: E402
from server.app import create_app  # noqa: E402
from server.engine import Engine  # noqa: E402
from server.settings import Settings  # noqa: E402
from server.tgi.schemas import MAX_SEED  # noqa: E402

from _server_helpers import serve  # noqa: E402

SETTINGS = Settings(max_new_tokens_limit=4)
MAX_EXAMPLES = 30
"""Per operation in the fuzzing phase; the coverage phase adds its boundary cases (~900)."""
CONFIG = {
    "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
    "checks": {"enabled": True},  # --checks all
}


def _value_at(body, field: str):
    """``body``'s value at a dotted field path (``parameters.seed``), or None."""
    for key in field.split("."):
        body = body.get(key) if isinstance(body, dict) else None
    return body


def _refusals(response) -> list[tuple[str, str]]:
    """(field, reason) of each bad field a 400 names, in either error shape (the message is
    ``field: reason`` pairs joined by ``; ``, `server.errors.validation_message`)."""
    error = json.loads(response.content).get("error")
    message = error.get("message", "") if isinstance(error, dict) else str(error)
    return [(part.partition(": ")[0], part.partition(": ")[2]) for part in message.split("; ")]


def _excusable(body, field: str, reason: str) -> bool:
    value = _value_at(body, field)
    huge_seed = field.endswith("seed") and isinstance(value, int) and value >= MAX_SEED
    integral_float = (isinstance(value, float) and value.is_integer()
                      and reason.startswith("Input should be a valid integer"))
    return huge_seed or integral_float


def keep_failure(ctx, failure, case, response) -> bool:
    """A ``filter_failure`` hook: drop the two refusals of schema-valid data that are not the
    document's fault, keep every other failure.

    1. Schemathesis compares integers as 64-bit floats (exact only up to 2**53), so its
       coverage phase sends 2**63 + a few hundred as a "valid" ``seed`` (< 2**63).
    2. Our request models are strict (`server.tgi.schemas`, tested in test_openai_errors.py):
       an integer field takes ``4``, not ``4.0``. JSON Schema's ``integer`` cannot say so (to
       it 4.0 is the integer 4; the document says it in words), and schemathesis sends such
       floats as valid integers.
    Dropped only when every field the 400 names is one of these, with that very value.
    """
    if type(failure).__name__ != "RejectedPositiveData" or response.status_code != 400:
        return True
    return not all(_excusable(case.body, field, reason) for field, reason in _refusals(response))


def _describe(label: str, name: str, failure, case, recorder, case_id: str) -> str:
    interaction = recorder.interactions.get(case_id)
    response = interaction.response if interaction is not None else None
    answer = (f"{response.status_code} {response.content[:300]!r}" if response is not None
              else "no response")
    return (f"{label} [{name}] {failure.title}: {failure.message[:400]}\n"
            f"    body: {str(case.body)[:400]}\n    answer: {answer}")


def run_schemathesis(url: str) -> tuple[list[str], events.EngineFinished, int]:
    """Run every phase and check against the server at ``url``: (failures as text, the final
    event, the number of cases sent)."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json",
                                           config=schemathesis.Config.from_dict(CONFIG))
    schema.hook("filter_failure")(keep_failure)
    problems, cases, finished = [], 0, None
    for event in st_engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            cases += len(recorder.cases)
            for case_id, checks in recorder.checks.items():
                for check in checks:
                    if check.status == Status.FAILURE:
                        problems.append(_describe(
                            recorder.label, check.name, check.failure_info.failure,
                            recorder.cases[case_id].value, recorder, case_id))
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            problems.append(f"error: {getattr(event, 'value', None) or event.exception!r}")
        elif isinstance(event, events.EngineFinished):
            finished = event
            problems += [f"after run: {f.title}: {f.message[:400]}" for f in event.failures]
    return problems, finished, cases


@pytest.fixture(scope="module")
def url(tiny_model, tokenizer):
    app = create_app(Engine(Decoder(tiny_model, tokenizer)), SETTINGS)
    with serve(app) as base:
        yield base


def test_the_openapi_document_holds_under_schemathesis(url):
    problems, finished, cases = run_schemathesis(url)
    assert not problems, f"{len(problems)} schemathesis failure(s):\n" + "\n".join(problems)
    assert finished is not None
    assert finished.stop_reason == StopReason.COMPLETED
    assert cases > 100  # it did send requests (every operation, coverage phase included)


# ---- what the document says, pinned (fast; the fuzzing above checks it holds) -------------


def _doc(tiny_model, tokenizer, **settings) -> dict:
    return create_app(Engine(Decoder(tiny_model, tokenizer)), Settings(**settings)).openapi()


def _schema_ref(response: dict, media_type: str = "application/json") -> str:
    return response["content"][media_type]["schema"]["$ref"].rsplit("/", 1)[-1]


def test_errors_have_the_routes_shape_and_no_fastapi_422(url):
    doc = httpx.get(f"{url}/openapi.json").json()
    assert not {"HTTPValidationError", "ValidationError"} & set(doc["components"]["schemas"])
    ops = doc["paths"]
    for path in ("/generate", "/generate_stream", "/"):
        responses = ops[path]["post"]["responses"]
        assert _schema_ref(responses["400"]) == _schema_ref(responses["422"]) == "TGIError"
        assert {"401", "429", "503"} <= set(responses)
    for path in ("/v1/chat/completions", "/v1/completions"):
        responses = ops[path]["post"]["responses"]
        assert "422" not in responses and _schema_ref(responses["400"]) == "OpenAIError"
        assert "content" not in responses["499"]  # no body
        assert responses["429"]["headers"]["Retry-After"]["required"] is True
    assert "422" not in ops["/v1/models"]["get"]["responses"]


def test_streams_and_metrics_have_their_content_types(url):
    ops = httpx.get(f"{url}/openapi.json").json()["paths"]
    assert list(ops["/generate_stream"]["post"]["responses"]["200"]["content"]) == [
        "text/event-stream"]
    for path in ("/", "/v1/chat/completions", "/v1/completions"):
        assert set(ops[path]["post"]["responses"]["200"]["content"]) == {
            "application/json", "text/event-stream"}
    (metrics_type,) = ops["/metrics"]["get"]["responses"]["200"]["content"]
    assert metrics_type.startswith("text/plain; version=0.0.4")
    assert httpx.get(f"{url}/metrics").headers["content-type"] == metrics_type


def test_the_document_carries_this_servers_limits_and_policy(tiny_model, tokenizer):
    doc = _doc(tiny_model, tokenizer, max_new_tokens_limit=7, safety_threshold=0.3,
               safety_schedule="periodic", safety_action="reweight")
    schemas = doc["components"]["schemas"]

    def branch(model: str, field: str) -> dict:
        return schemas[model]["properties"][field]["anyOf"][0]

    assert branch("GenerateParameters", "max_new_tokens")["maximum"] == 7
    assert branch("CompletionRequest", "max_tokens")["maximum"] == 7
    assert branch("ChatCompletionRequest", "max_completion_tokens")["maximum"] == 7
    assert branch("SafetyOverrides", "threshold")["maximum"] == 0.3
    assert branch("SafetyOverrides", "schedule")["enum"] == ["each", "annealing", "periodic"]
    assert branch("SafetyOverrides", "action")["enum"] == ["refuse", "reweight"]
    assert "securitySchemes" not in doc["components"]


def test_with_api_keys_every_route_but_health_and_metrics_needs_a_bearer_key(tiny_model,
                                                                            tokenizer):
    doc = _doc(tiny_model, tokenizer, api_keys="k1")
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert doc["security"] == [{"bearer": []}]
    assert doc["paths"]["/health"]["get"]["security"] == []
    assert doc["paths"]["/metrics"]["get"]["security"] == []
    assert "security" not in doc["paths"]["/generate"]["post"]  # the global one applies


@pytest.mark.parametrize("path, body, field", [
    ("/generate", {"inputs": ""}, "inputs"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": [""]}, "prompt"),
])
def test_empty_inputs_are_refused_as_the_schema_says(url, path, body, field):
    doc = httpx.get(f"{url}/openapi.json").json()
    model = "GenerateRequest" if path == "/generate" else "CompletionRequest"
    prop = doc["components"]["schemas"][model]["properties"][field]
    assert all(b.get("minLength", b.get("items", {}).get("minLength")) == 1
               for b in prop.get("anyOf", [prop]))
    r = httpx.post(f"{url}{path}", json=body, timeout=30)
    assert r.status_code == 400
    message = r.json()["error"] if path == "/generate" else r.json()["error"]["message"]
    assert message.startswith(f"{field}:")


@pytest.mark.parametrize("parameters", [
    {"temperature": 1e308, "repetition_penalty": 1e308},
    {"temperature": 1e308, "repetition_penalty": 1e308, "top_k": 3},
    {"temperature": 1e39, "repetition_penalty": 1e39, "top_p": 0.5},
])
def test_extreme_schema_valid_sampling_values_generate(url, parameters):
    """Found by the fuzzing: past float32's range these overflowed to inf and NaN (a 424);
    the library now applies them within its ceilings (`safety_decoding.sampling`)."""
    r = httpx.post(f"{url}/generate", timeout=30, json={
        "inputs": "Hi there", "parameters": {"max_new_tokens": 3, **parameters}})
    assert r.status_code == 200, r.text
