"""Python websockets on both sides of an mc-proxy L7 route.

  l7_websocket.py serve
      A plaintext echo server on 127.0.0.1 (port chosen by the kernel).
      Prints "port N", then one JSON event per connection:
      {"event": "open", "path", "xff", "host"}. Text "whoami" is answered
      with the connection's X-Forwarded-For; anything else is echoed.
  l7_websocket.py call URL CA_FILE
      Connects to URL (wss://HOST:PORT/PATH; every *.test name resolves to
      127.0.0.1) trusting CA_FILE, sends text and a 1 MiB binary message,
      prints one JSON object of what came back.

Exit 3 when websockets is missing, 1 on a failure.
"""

import hashlib
import json
import os
import socket
import ssl
import sys

try:
    import websockets
    from websockets.sync.client import connect
    from websockets.sync.server import serve as ws_serve
except ImportError as err:
    print(f"websockets missing: {err}", file=sys.stderr)
    sys.exit(3)

_getaddrinfo = socket.getaddrinfo


def _loopback(host, *args, **kwargs):
    if isinstance(host, str) and host.endswith(".test"):
        host = "127.0.0.1"
    return _getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = _loopback


def serve():
    def handler(ws):
        headers = ws.request.headers
        print(json.dumps({"event": "open", "path": ws.request.path,
                          "xff": headers.get("X-Forwarded-For"), "host": headers.get("Host")}),
              flush=True)
        for message in ws:
            if message == "whoami":
                ws.send("xff=" + str(headers.get("X-Forwarded-For")))
            else:
                ws.send(message)

    with ws_serve(handler, "127.0.0.1", 0, max_size=None) as server:
        print(f"port {server.socket.getsockname()[1]}", flush=True)
        server.serve_forever()


def call(url, ca):
    context = ssl.create_default_context(cafile=ca)
    blob = os.urandom(1 << 20)
    result = {"websockets": websockets.__version__}
    with connect(url, ssl=context, max_size=None, open_timeout=20, close_timeout=5) as ws:
        ws.send("hello")
        result["text"] = ws.recv(timeout=20)
        ws.send("whoami")
        result["whoami"] = ws.recv(timeout=20)
        ws.send(blob)
        echoed = ws.recv(timeout=20)
        result["binary_sent"] = hashlib.sha256(blob).hexdigest()
        result["binary_back"] = hashlib.sha256(echoed).hexdigest()
        result["binary_len"] = len(echoed)
    print(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve()
    else:
        call(*sys.argv[2:4])
