"""A receiver like the demo's, for the compose quick start: events at /events/<type>,
dead letters at /dlq. It answers as the demo's sink does and prints one line per request:
  invoice.sent  400 + X-Retry-After: 1 on the first try (a scheduled retry), then 200
  legacy.ping   410 Gone (a dead letter)
  anything else 200
With WEBHOOK_SECRET set it checks each request's signature (verify.py) and answers 401
to a bad one.
"""
import http.server
import os

from verify import verify

SECRET = os.environ.get("WEBHOOK_SECRET", "")


class Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        h = self.headers
        if SECRET and not self.path.startswith("/dlq") and not verify(
                SECRET, h.get("webhook-id", ""), h.get("webhook-timestamp", ""),
                h.get("webhook-signature", ""), body):
            return self.answer(401, {})
        if self.path.startswith("/dlq"):
            return self.answer(200, {})
        kind = self.path.rsplit("/", 1)[-1]
        if kind == "invoice.sent" and h.get("X-Event-Attempt") == "1":
            return self.answer(400, {"X-Retry-After": "1"})
        if kind == "legacy.ping":
            return self.answer(410, {})
        return self.answer(200, {})

    def do_OPTIONS(self):  # the worker's probe of a paused host
        self.answer(204, {})

    def answer(self, status, headers):
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, fmt, *args):
        print(f"{self.command} {self.path} id={self.headers.get('X-Event-Id')} "
              f"attempt={self.headers.get('X-Event-Attempt')} -> {args[1]}", flush=True)


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "8000"))
    http.server.ThreadingHTTPServer(("0.0.0.0", port), Receiver).serve_forever()
