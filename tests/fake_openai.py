"""One fake OpenAI-compatible `/chat/completions` endpoint for the tests of the judges, the
benchmarks' raters and `cwdpo.perturb`: 127.0.0.1, a free port, a daemon thread; no network."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: what `reply` returns: (status, JSON body) or (status, JSON body, extra headers); None when
#: nothing is to be sent (the client hung up)
Reply = tuple[int, Any] | tuple[int, Any, dict[str, str]] | None


def chat_reply(content: str) -> tuple[int, Any]:
    """A 200 with one assistant message, as an OpenAI-compatible server sends it."""
    return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


class FakeChatServer:
    """Subclasses answer each POST in `reply(body, headers)`; `url` is the `/v1` base."""

    def __init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                try:
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                    out = server.reply(body, self.headers, self.path)
                    if out is not None:
                        self._send(*out)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up

            def _send(self, code: int, obj: Any, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def reply(self, body: dict[str, Any], headers: Any, path: str) -> Reply:
        raise NotImplementedError

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
