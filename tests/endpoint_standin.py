"""A stand-in OpenAI-compatible server (the real one is vLLM's; this one answers instantly and can fail on cue)."""

from __future__ import annotations

import json


class FlakyEndpoint:
    """An OpenAI-style server: serves ``served``; while ``down``, answers prompts containing "down" with 503;
    everything else with "ok"."""

    def __init__(self, served: str):
        self.down = True
        endpoint = self
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        import threading

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _json(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._json(200, {"object": "list", "data": [{"id": served, "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if endpoint.down and "down" in body["messages"][-1]["content"]:
                    return self._json(503, {"error": {"message": "replica restarting"}})
                self._json(200, {"choices": [{"message": {"role": "assistant", "content": "ok"},
                                              "finish_reason": "stop"}],
                                 "usage": {"prompt_tokens": 3, "completion_tokens": 1}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
