"""A mid-response trip never lets a truncated token reach any SSE frame or /generate."""

from fastapi.testclient import TestClient

from conftest import scripted_model
from safety_decoding.decode import Decoder
from safety_decoding.text import refusal_separator
from server.app import create_app
from server.engine import Engine
from server.settings import Settings

from _server_helpers import sse_data

# Checks n=1..3 pass (g_0..g_2 cleared), n=4..6 fail: with tau=3 the trip cuts back to g_3.
SCRIPT = [-5, -5, -5, 5, 5, 5, -5]
BODY = {"inputs": "Tell me a story.", "parameters": {"max_new_tokens": 30, "details": True}}


def _client(tokenizer, checks):
    model = scripted_model(tokenizer, -5.0, checks)
    app = create_app(Engine(Decoder(model, tokenizer)), Settings(safety_tau=3))
    return model, app


def test_no_truncated_token_in_any_sse_frame_or_response(tokenizer):
    model, app = _client(tokenizer, [-5.0])
    with TestClient(app) as c:
        model.head.reset()
        plain = c.post("/generate", json=BODY).json()["details"]["tokens"]
    model, app = _client(tokenizer, SCRIPT)
    passed = tokenizer.decode([t["id"] for t in plain[:3]])
    refusal = tokenizer(refusal_separator(passed, True) + model.config.refusal_prefix,
                        add_special_tokens=False)["input_ids"]
    with TestClient(app) as c:
        model.head.reset()
        with c.stream("POST", "/generate_stream", json=BODY) as r:
            frames = sse_data(r.read().decode())
        model.head.reset()
        full = c.post("/generate", json=BODY).json()
    ids = [f["token"]["id"] for f in frames]
    assert ids[:3] == [t["id"] for t in plain[:3]]
    assert ids[3:3 + len(refusal)] == refusal  # g_3.. never streamed: the refusal comes next
    assert frames[-1]["details"]["finish_reason"] == "content_filter"
    assert [t["id"] for t in full["details"]["tokens"]][:3 + len(refusal)] == ids[:3 + len(refusal)]
    assert full["safety"]["stage"] == "response" and full["safety"]["trip_token"] == 3
