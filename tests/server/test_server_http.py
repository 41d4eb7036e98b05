"""End to end over a real socket (uvicorn in a thread): a client that disconnects mid-request
gets its request aborted in the engine and counted as finish_reason="abort"."""

from __future__ import annotations


import httpx
import pytest

from safety_decoding.prompt import build_chat_prompt
from server.app import create_app
from server.engine import Engine
from server.settings import Settings

from _server_helpers import SlowDecoder, aborts, serve, sse_data, start_server, wait_for_aborts


@pytest.fixture(scope="module")
def decoder(tiny_model, tokenizer):
    return SlowDecoder(tiny_model, tokenizer, delay=0.02)


@pytest.fixture(scope="module")
def server(decoder):
    """One request runs at a time (max_num_seqs=1), so a second one waits in the queue."""
    app = create_app(Engine(decoder, max_num_seqs=1, max_waiting=4), Settings(max_new_tokens_limit=1024))
    with serve(app) as url:
        yield url




def test_stream_over_http_is_sse_frames(server):
    with httpx.stream("POST", f"{server}/generate_stream", timeout=30,
                      json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}}) as r:
        body = r.read().decode()
    assert body.startswith("data: {") and body.endswith("\n\n")
    events = sse_data(body)
    assert events[-1]["generated_text"] == "".join(e["token"]["text"] for e in events)


def test_client_leaving_a_stream_aborts_the_request(server):
    before = aborts(server)
    with httpx.stream("POST", f"{server}/generate_stream", timeout=30,
                      json={"inputs": "Hi", "parameters": {"max_new_tokens": 1000}}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    # Closing an unfinished response closes the connection: the server sees a disconnect.
    wait_for_aborts(server, before + 1)
    assert httpx.get(f"{server}/metrics").text  # still serving
    r = httpx.post(f"{server}/generate", timeout=30,
                   json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200


def test_client_leaving_generate_aborts_the_request(server):
    before = aborts(server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/generate", timeout=httpx.Timeout(5, read=0.3),
                   json={"inputs": "Hi", "parameters": {"max_new_tokens": 1000}})
    wait_for_aborts(server, before + 1)


def test_client_leaving_while_queued_drops_the_request_unrun(server, decoder, tokenizer):
    before = aborts(server)
    with httpx.stream("POST", f"{server}/generate_stream", timeout=30, json={
            "inputs": "Hi", "parameters": {"max_new_tokens": 1000, "ignore_eos": True}}) as busy:
        lines = busy.iter_lines()  # keep a reference: dropping it closes the connection
        assert next(lines).startswith("data: ")  # running: the next one queues
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server}/generate", timeout=httpx.Timeout(5, read=0.3),
                       json={"inputs": "queued one", "parameters": {"max_new_tokens": 5}})
        wait_for_aborts(server, before + 1)  # dropped while the first still runs
    wait_for_aborts(server, before + 2)
    queued = build_chat_prompt(tokenizer, [{"role": "user", "content": "queued one"}]).ids
    assert tuple(queued) not in {tuple(ids) for ids in decoder.ran}


def test_shutdown_drains_running_streams(tiny_model, tokenizer):
    """SIGTERM (uvicorn's should_exit) lets a running stream finish; the engine stops after."""
    app = create_app(Engine(SlowDecoder(tiny_model, tokenizer, delay=0.02)),
                     Settings(max_new_tokens_limit=64))
    srv, thread, url = start_server(app, timeout_graceful_shutdown=30)
    with httpx.stream("POST", f"{url}/generate_stream", timeout=30, json={
            "inputs": "Hi", "parameters": {"max_new_tokens": 40, "ignore_eos": True}}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        srv.should_exit = True
        body = [line for line in lines if line.startswith("data: ")]
    details = sse_data("\n\n".join(body))[-1]["details"]
    assert details["finish_reason"] != "abort" and details["generated_tokens"] == 40
    thread.join(30)
    assert not thread.is_alive()
    assert not app.state.engine.ready
