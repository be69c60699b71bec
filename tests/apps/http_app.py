"""A plain HTTP/1.1 app (standard library only, no SDK), as its own process.

    python tests/apps/http_app.py [--port N]

Keep-alive (HTTP/1.1), one thread per connection. Paths:
  /echo            the request body back; x-method, x-path, x-host, x-caller headers describe the request
  /headers         the request's header fields as JSON
  /sleep?s=F       sleeps F seconds, then "slept"
  /big?n=N         N bytes
  /chunked?n=K     K chunks of "chunk-<i>\\n", Transfer-Encoding: chunked
  /status?code=C   an empty answer with status C
  /count           records the body (a unique id) and returns it; /seen returns {"unique": N, "duplicates": M}
  /close           answers with Connection: close
  /connections     how many TCP connections the app has accepted
Prints "http app ready port=N" on stdout once listening.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

SEEN: dict[bytes, int] = {}
LOCK = threading.Lock()
CONNECTIONS = [0]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        with LOCK:
            CONNECTIONS[0] += 1

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        url = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        body = self._body()
        path = url.path
        if path == "/echo" or path.startswith("/echo/"):
            self._send(200, body, {"x-method": self.command, "x-path": self.path, "x-host": self.headers.get("Host", ""),
                                   "x-caller": self.headers.get("x-octoproxy-caller", "")})  # fmt: skip
        elif path == "/headers":
            self._send(200, json.dumps([[k.lower(), v] for k, v in self.headers.items()]).encode(), {"content-type": "application/json"})
        elif path == "/sleep":
            time.sleep(float(q.get("s", "1")))
            self._send(200, b"slept")
        elif path == "/big":
            self._send(200, b"b" * int(q.get("n", "0")))
        elif path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(int(q.get("n", "3"))):
                chunk = f"chunk-{i}\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/status":
            self._send(int(q.get("code", "200")), b"")
        elif path == "/count":
            with LOCK:
                SEEN[body] = SEEN.get(body, 0) + 1
            self._send(200, body)
        elif path == "/seen":
            with LOCK:
                dups = sum(n - 1 for n in SEEN.values())
                out = {"unique": len(SEEN), "duplicates": dups}
            self._send(200, json.dumps(out).encode())
        elif path == "/connections":
            self._send(200, str(CONNECTIONS[0]).encode())
        elif path == "/close":
            self.close_connection = True
            self._send(200, b"bye", {"Connection": "close"})
        else:
            self._send(404, b"no such path\n")

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _handle


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"http app ready port={server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
