"""Test doubles for the LLM stages: a fake ``vllm.LLM`` and a real HTTP stub of an OpenAI-compatible
server (plus image hosting) on 127.0.0.1.

``FakeLLM`` has vLLM's ``LLM.chat`` / ``LLM.generate`` signatures and returns RequestOutput-shaped
objects (``prompt_token_ids``, ``outputs[0].text / token_ids / finish_reason``). For subprocess
runs (``llm.engine_factory=llm_fakes:FakeLLM``) it is steered by environment variables:
``FAKE_LLM_LOG`` (a file that gets one line per ANSWERED request: its prompt text, JSON-encoded)
and ``FAKE_LLM_KILL_AFTER`` (SIGKILL itself when chat is called for the (N+1)-th time).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace


def conversation_text(conversation) -> tuple[str, bool]:
    """(the user turn's text, whether it holds an image) of one OpenAI-style conversation."""
    content = conversation[-1]["content"]
    if isinstance(content, str):
        return content, False
    text = " ".join(p["text"] for p in content if p.get("type") == "text")
    has_image = any(p.get("type") == "image_url" and p["image_url"]["url"].startswith("data:image/") for p in content)
    return text, has_image


def answer_for(text: str, has_image: bool) -> str:
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    if has_image:
        return f"Here is a description:\n\nA sturdy item in colour {digest}."
    return f"The user likes practical things ({digest})."


class FakeLLM:
    """Stands in for ``vllm.LLM``: records every conversation it is given."""

    instances: list["FakeLLM"] = []
    fail_after_calls: int | None = None  # raise RuntimeError on the call after this many chat calls

    def __init__(self, model: str, **kwargs):
        self.model = model
        self.kwargs = kwargs
        self.calls: list[list] = []  # conversations per chat call
        self.answered: list[str] = []  # prompt texts answered
        FakeLLM.instances.append(self)

    def get_tokenizer(self):
        return None

    def chat(self, messages, sampling_params=None, use_tqdm=True, lora_request=None, chat_template=None,
             chat_template_content_format="auto", add_generation_prompt=True, continue_final_message=False,
             tools=None, chat_template_kwargs=None, mm_processor_kwargs=None):
        if messages and isinstance(messages[0], dict):  # one conversation
            messages = [messages]
        kill_after = os.environ.get("FAKE_LLM_KILL_AFTER")
        if kill_after is not None and len(self.calls) >= int(kill_after):
            os.kill(os.getpid(), signal.SIGKILL)  # like kill -9: no cleanup at all
        if self.fail_after_calls is not None and len(self.calls) >= self.fail_after_calls:
            raise RuntimeError("fake engine crashed")
        self.calls.append(list(messages))
        self.sampling_params = sampling_params
        outs = []
        for n, conv in enumerate(messages):
            text, image = conversation_text(conv)
            outs.append(self._output(n, text, answer_for(text, image)))
        self._log([conversation_text(c)[0] for c in messages])
        return outs

    def generate(self, prompts, sampling_params=None, use_tqdm=True, lora_request=None):
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        texts = [p if isinstance(p, str) else p.get("prompt", "") for p in prompts]
        self._log(texts)
        return [self._output(n, t, answer_for(t, False)) for n, t in enumerate(texts)]

    def _output(self, n: int, prompt: str, answer: str):
        self.answered.append(prompt)
        completion = SimpleNamespace(index=0, text=answer, token_ids=list(range(len(answer.split()))),
                                     cumulative_logprob=None, logprobs=None, finish_reason="stop", stop_reason=None)
        return SimpleNamespace(request_id=str(n), prompt=prompt, prompt_token_ids=list(range(len(prompt) // 4)),
                               prompt_logprobs=None, outputs=[completion], finished=True)

    @staticmethod
    def _log(texts):
        path = os.environ.get("FAKE_LLM_LOG")
        if path:
            with open(path, "a") as f:
                for t in texts:
                    f.write(json.dumps(t) + "\n")


def sent_prompts(instances) -> list[str]:
    return [conversation_text(c)[0] for inst in instances for call in inst.calls for c in call]


class StubServer:
    """OpenAI-compatible ``POST /v1/chat/completions`` and ``GET /img/<name>`` on an ephemeral port.

    ``fail_first``: the first N attempts of every distinct prompt get ``fail_statuses`` (cycled);
    ``fatal``: (status, message) answered to every chat request; ``delay``: seconds per answer.
    ``images``: name -> (bytes, failures before success, or None for a permanent 404).
    """

    def __init__(self, delay=0.0, fail_first=0, fail_statuses=(429, 500), fatal=None, images=None):
        self.delay = delay
        self.fail_first = fail_first
        self.fail_statuses = tuple(fail_statuses)
        self.fatal = fatal
        self.images = dict(images or {})
        self.lock = threading.Lock()
        self.requests: list[dict] = []  # every chat attempt: {"body", "headers", "status"}
        self.attempts: dict[str, int] = {}
        self.image_gets: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            wbufsize = 1 << 16  # headers and body leave in one segment (no Nagle/delayed-ACK stalls)

            def log_message(self, *args):
                pass

            def _send(self, status, payload, ctype="application/json", headers=None):
                blob = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(blob)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(blob)

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                with server.lock:
                    n = server.image_gets[name] = server.image_gets.get(name, 0) + 1
                entry = server.images.get(name)
                if entry is None or entry[1] is None:
                    return self._send(404, {"error": "not found"})
                blob, failures = entry
                if n <= failures:
                    return self._send(500, {"error": "flaky"})
                return self._send(200, blob, ctype="image/png" if name.endswith(".png") else "application/octet-stream")

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server.lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if server.delay:
                        time.sleep(server.delay)
                    status, payload, headers = server._answer(self.path, body)
                    with server.lock:
                        server.requests.append({"body": body, "headers": dict(self.headers), "status": status})
                finally:
                    with server.lock:
                        server.in_flight -= 1
                self._send(status, payload, headers=headers)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def _answer(self, path, body):
        if path.rstrip("/") != "/v1/chat/completions":
            return 404, {"error": {"message": f"no route {path}"}}, {}
        if self.fatal:
            status, message = self.fatal
            return status, {"error": {"message": message, "type": "invalid_request_error"}}, {}
        text, image = conversation_text(body["messages"])
        key = hashlib.sha256(text.encode() + (b"1" if image else b"0")).hexdigest()
        with self.lock:
            n = self.attempts[key] = self.attempts.get(key, 0) + 1
        if n <= self.fail_first:
            status = self.fail_statuses[(n - 1) % len(self.fail_statuses)]
            return status, {"error": {"message": "try again later"}}, {"Retry-After": "0"}
        answer = answer_for(text, image)
        return 200, {
            "id": "chatcmpl-stub", "object": "chat.completion", "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(text) // 4, "completion_tokens": len(answer.split()),
                      "total_tokens": len(text) // 4 + len(answer.split())},
        }, {}

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def ok_requests(self) -> list[dict]:
        return [r for r in self.requests if r["status"] == 200]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
