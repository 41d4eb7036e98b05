"""API keys and CORS over real HTTP: 401 in OpenAI's shape under /v1 and TGI's elsewhere,
/health always open, /metrics open unless ESS_METRICS_REQUIRE_AUTH, preflight answered."""

from __future__ import annotations

import httpx
import openai
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError, TextGenerationError
from openai import OpenAI

from safety_decoding.decode import Decoder
from server.app import create_app
from server.auth import bearer_token, key_matches
from server.engine import Engine
from server.settings import Settings

from _server_helpers import serve

KEYS = ("key-one", "key-two")
ORIGIN = "https://app.example"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def _app(tiny_model, tokenizer, **settings):
    return create_app(Engine(Decoder(tiny_model, tokenizer)),
                      Settings(max_new_tokens_limit=16, safety_action="monitor", **settings))


@pytest.fixture(scope="module")
def keyed(tiny_model, tokenizer):
    with serve(_app(tiny_model, tokenizer, api_keys=KEYS, cors_origins=(ORIGIN,))) as url:
        yield url


@pytest.fixture(scope="module")
def open_server(tiny_model, tokenizer):
    with serve(_app(tiny_model, tokenizer)) as url:
        yield url


def _bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


# ---- keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", KEYS)
def test_each_configured_key_works_with_the_openai_client(keyed, key):
    client = OpenAI(base_url=f"{keyed}/v1", api_key=key, max_retries=0, timeout=60)
    assert client.models.list().data[0].id
    r = client.chat.completions.create(**CHAT)
    assert r.usage.completion_tokens == 2


def test_a_wrong_key_is_401_in_openai_shape(keyed):
    client = OpenAI(base_url=f"{keyed}/v1", api_key="key-three", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as info:
        client.chat.completions.create(**CHAT)
    err = info.value
    assert err.status_code == 401
    assert (err.type, err.code) == ("invalid_request_error", "invalid_api_key")
    assert err.response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "key-one"},
                                     {"Authorization": "Basic a2V5LW9uZQ=="},
                                     {"Authorization": "Bearer"}, _bearer("key-on"),
                                     _bearer("key-one-and-more")])
def test_requests_without_a_valid_bearer_key_are_401_on_every_route(keyed, headers):
    r = httpx.post(f"{keyed}/v1/chat/completions", json=CHAT, headers=headers, timeout=30)
    assert r.status_code == 401
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "invalid_api_key"
    r = httpx.get(f"{keyed}/v1/models", headers=headers, timeout=30)
    assert r.status_code == 401 and "error" in r.json()
    for method, path in (("POST", "/generate"), ("POST", "/generate_stream"), ("POST", "/"),
                         ("GET", "/info"), ("GET", "/docs")):
        r = httpx.request(method, keyed + path, json={"inputs": "Hi"}, headers=headers,
                          timeout=30)
        assert r.status_code == 401, path
        assert r.json()["error_type"] == "authentication", path  # TGI's shape off /v1


def test_the_scheme_is_case_insensitive_and_tgi_routes_accept_the_key(keyed):
    r = httpx.post(f"{keyed}/generate", headers={"Authorization": "bearer key-two"},
                   json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}, timeout=30)
    assert r.status_code == 200 and "generated_text" in r.json()


def test_health_and_metrics_need_no_key(keyed):
    assert httpx.get(f"{keyed}/health", timeout=30).status_code == 200
    r = httpx.get(f"{keyed}/metrics", timeout=30)
    assert r.status_code == 200 and "ess_requests_total" in r.text


def test_metrics_can_require_the_key(tiny_model, tokenizer):
    with serve(_app(tiny_model, tokenizer, api_keys=KEYS, metrics_require_auth=True)) as url:
        r = httpx.get(f"{url}/metrics", timeout=30)
        assert r.status_code == 401 and r.json()["error_type"] == "authentication"
        assert httpx.get(f"{url}/metrics", headers=_bearer("key-one"),
                         timeout=30).status_code == 200
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200


def test_huggingface_hub_sends_its_key(keyed):
    hf = InferenceClient(base_url=keyed, api_key="key-one", timeout=60)
    assert isinstance(hf.text_generation("Hi", max_new_tokens=2), str)
    with pytest.raises(TextGenerationError) as info:  # it parses our TGI-shaped body
        InferenceClient(base_url=keyed, api_key="nope", timeout=60).text_generation(
            "Hi", max_new_tokens=2)
    assert str(info.value) == "invalid API key"
    assert isinstance(info.value.__cause__, HfHubHTTPError)
    assert info.value.__cause__.response.status_code == 401


def test_without_keys_nothing_needs_a_key(open_server):
    r = httpx.post(f"{open_server}/v1/chat/completions", json=CHAT, timeout=30)
    assert r.status_code == 200
    r = httpx.post(f"{open_server}/v1/chat/completions", json=CHAT, timeout=30,
                   headers=_bearer("anything"))
    assert r.status_code == 200


# ---- CORS ----------------------------------------------------------------------------------


def test_a_preflight_from_an_allowed_origin_is_answered_without_a_key(keyed):
    r = httpx.options(f"{keyed}/v1/chat/completions", timeout=30, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    allowed = r.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed
    assert "access-control-allow-credentials" not in r.headers


def test_cors_headers_are_on_responses_and_on_401s_for_allowed_origins_only(keyed):
    r = httpx.get(f"{keyed}/v1/models", headers={"Origin": ORIGIN, **_bearer("key-one")},
                  timeout=30)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.get(f"{keyed}/v1/models", headers={"Origin": ORIGIN}, timeout=30)
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.get(f"{keyed}/v1/models", timeout=30,
                  headers={"Origin": "https://evil.example", **_bearer("key-one")})
    assert "access-control-allow-origin" not in r.headers
    r = httpx.options(f"{keyed}/v1/models", timeout=30, headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in r.headers


def test_without_cors_origins_there_are_no_cors_headers(open_server):
    r = httpx.options(f"{open_server}/v1/chat/completions", timeout=30, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    assert r.status_code == 405
    r = httpx.get(f"{open_server}/v1/models", headers={"Origin": ORIGIN}, timeout=30)
    assert "access-control-allow-origin" not in r.headers


# ---- settings and the pure helpers --------------------------------------------------------


def test_settings_read_comma_separated_lists_from_the_environment(monkeypatch):
    monkeypatch.setenv("ESS_API_KEYS", " alpha, beta ,,")
    monkeypatch.setenv("ESS_CORS_ORIGINS", "https://a.example,https://b.example")
    monkeypatch.setenv("ESS_METRICS_REQUIRE_AUTH", "true")
    s = Settings()
    assert s.api_keys == ("alpha", "beta")
    assert s.cors_origins == ("https://a.example", "https://b.example")
    assert s.metrics_require_auth is True
    assert "alpha" not in repr(s)  # keys never land in logs
    monkeypatch.delenv("ESS_API_KEYS")
    monkeypatch.delenv("ESS_CORS_ORIGINS")
    monkeypatch.delenv("ESS_METRICS_REQUIRE_AUTH")
    s = Settings()
    assert (s.api_keys, s.cors_origins, s.metrics_require_auth) == ((), (), False)


@pytest.mark.parametrize("header, token", [
    ("Bearer abc", "abc"), ("bearer abc", "abc"), ("BEARER  abc ", "abc"), ("Basic abc", None),
    ("abc", None), ("Bearer", None), ("", None), (None, None)])
def test_bearer_token(header, token):
    assert bearer_token(header) == token


def test_key_matches_only_whole_keys():
    assert key_matches("key-two", KEYS) and key_matches("key-one", KEYS)
    assert not key_matches("key-", KEYS) and not key_matches("key-one ", KEYS)
    assert not key_matches("anything", ())
