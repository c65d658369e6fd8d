"""aioquic HTTP/3 on both sides of an mc-proxy QUIC listener.

  quic_h3.py serve --cert PEM --key KEY --name NAME
      An HTTP/3 server on UDP 127.0.0.1 (port chosen by the kernel), its
      certificate chain (leaf first) and key from files. Prints "port N",
      then one JSON event per line:
        {"event": "hello", "sni", "hello_bytes", "alpn_count"}  each ClientHello read
        {"event": "request", "method", "path", "authority", "peer"}
        {"event": "download_queued", "path", "bytes"}  the last byte handed to aioquic
      It answers:
        GET /                  200 text/html naming the server:
                               <p id=who>backend=NAME authority=AUTHORITY</p>
        GET /download?bytes=N  200 application/octet-stream: N bytes of the
                               counter pattern (below), streamed: at most a
                               few MiB are buffered at any time
        anything else          404
  quic_h3.py get URL --ca CA [--server-name SNI] [--connect IP] [--inflate]
                 [--timeout S] [--trace]
      One GET over HTTP/3 to URL's port on --connect (127.0.0.1 by default),
      with SNI --server-name (URL's host by default), trusting CA. --inflate
      adds long ALPN names after "h3" so the ClientHello is over 1,300 bytes
      and spans two Initial packets (two datagrams of 1,200 bytes). --trace
      counts the Initial packets carrying CRYPTO the client sent (qlog).
      Prints one JSON object: {status, length, sha256, first_bytes (hex of
      the first 16), body (the text if under 64 KiB), hello_bytes, alpn,
      elapsed_ms, mib_per_s, local_port (the client's UDP port),
      initial_crypto_packets (with --trace), datagrams_received}; on a
      failure {"error", "datagrams_received"} and exit 1.

The counter pattern: the big-endian u32 sequence 0, 1, 2, ... (byte i is
byte i % 4 of the word i // 4), so a lost, repeated or misplaced range
changes the hash.

Exit 3 when aioquic is missing.
"""

import argparse
import asyncio
import hashlib
import json
import socket
import sys
import time
from array import array
from urllib.parse import parse_qs, urlparse

try:
    import aioquic
    from aioquic import tls
    from aioquic.asyncio import QuicConnectionProtocol, connect, serve as quic_serve
    from aioquic.h3.connection import H3_ALPN, H3Connection
    from aioquic.h3.events import DataReceived, HeadersReceived
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.events import ConnectionTerminated, ProtocolNegotiated
    from aioquic.quic.logger import QuicLogger
except ImportError as err:
    print(f"aioquic missing: {err}", file=sys.stderr)
    sys.exit(3)

# Flow-control windows large enough for loopback throughput.
WINDOW = 16 << 20
# The download's bytes handed to aioquic but not yet acknowledged, at most.
SEND_HIGH = 4 << 20
CHUNK = 256 << 10
# Socket buffers: a receiver short of CPU (tests share the machine with
# builds) then queues instead of dropping, and aioquic's slow loss recovery
# stays out of the measurement. Capped by net.core.rmem_max / wmem_max.
SOCKET_BUFFER = 4 << 20


def grow_buffers(transport):
    sock = transport.get_extra_info("socket")
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        except OSError:
            pass


def emit(event):
    print(json.dumps(event), flush=True)


def pattern(offset, n):
    """Bytes [offset, offset + n) of the counter pattern."""
    first = offset // 4
    words = array("I", range(first, (offset + n + 3) // 4))
    if sys.byteorder == "little":
        words.byteswap()
    skip = offset - first * 4
    return words.tobytes()[skip:skip + n]


# ---- the server ------------------------------------------------------------

def _watch_hellos():
    """Reports every ClientHello the server reads (SNI, size, ALPN count):
    what reached the backend through the proxy."""
    original = tls.pull_client_hello

    def pull(buf):
        start = buf.tell()
        hello = original(buf)
        emit({"event": "hello", "sni": hello.server_name, "hello_bytes": buf.tell() - start,
              "alpn_count": len(hello.alpn_protocols or [])})
        return hello

    tls.pull_client_hello = pull


class H3Server(QuicConnectionProtocol):
    name = "?"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._h3 = None
        # stream id -> [next offset, total, path]
        self._downloads = {}

    def quic_event_received(self, event):
        if isinstance(event, ProtocolNegotiated) and event.alpn_protocol in H3_ALPN:
            self._h3 = H3Connection(self._quic)
        if self._h3 is not None:
            for h3_event in self._h3.handle_event(event):
                if isinstance(h3_event, HeadersReceived):
                    self._request(h3_event)

    def _request(self, event):
        headers = {k.decode(): v.decode() for k, v in event.headers}
        path = headers.get(":path", "")
        authority = headers.get(":authority", "")
        peer = self._quic._network_paths[0].addr if self._quic._network_paths else None
        emit({"event": "request", "method": headers.get(":method"), "path": path,
              "authority": authority, "peer": f"{peer[0]}:{peer[1]}" if peer else None})
        url = urlparse(path)
        sid = event.stream_id
        if headers.get(":method") == "GET" and url.path == "/":
            body = (f"<!doctype html><title>{self.name}</title>"
                    f"<p id=who>backend={self.name} authority={authority}</p>\n").encode()
            self._answer(sid, 200, "text/html", len(body))
            self._h3.send_data(sid, body, end_stream=True)
        elif headers.get(":method") == "GET" and url.path == "/download":
            total = int(parse_qs(url.query).get("bytes", ["0"])[0])
            self._answer(sid, 200, "application/octet-stream", total)
            if total == 0:
                self._h3.send_data(sid, b"", end_stream=True)
            else:
                self._downloads[sid] = [0, total, path]
        else:
            body = b"not found\n"
            self._answer(sid, 404, "text/plain", len(body))
            self._h3.send_data(sid, body, end_stream=True)
        self.transmit()

    def _answer(self, sid, status, kind, length):
        self._h3.send_headers(sid, [
            (b":status", str(status).encode()),
            (b"server", f"aioquic/{aioquic.__version__} {self.name}".encode()),
            (b"content-type", kind.encode()),
            (b"content-length", str(length).encode()),
        ])

    def _pump(self):
        """Hands each download's next chunks to aioquic while little of it is
        unacknowledged (called before every transmit: after each datagram
        received, ACKs included, and each timer)."""
        for sid, state in list(self._downloads.items()):
            stream = self._quic._streams.get(sid)
            if stream is None:
                del self._downloads[sid]
                continue
            sender = stream.sender
            offset, total, path = state
            while offset < total and sender._buffer_stop - sender._buffer_start < SEND_HIGH:
                n = min(CHUNK, total - offset)
                self._h3.send_data(sid, pattern(offset, n), end_stream=offset + n == total)
                offset += n
            state[0] = offset
            if offset == total:
                del self._downloads[sid]
                emit({"event": "download_queued", "path": path, "bytes": total})

    def transmit(self):
        if self._downloads:
            self._pump()
        super().transmit()


async def serve(args):
    _watch_hellos()
    config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN,
                               max_data=WINDOW, max_stream_data=WINDOW, idle_timeout=30)
    config.load_cert_chain(args.cert, args.key)
    H3Server.name = args.name
    server = await quic_serve("127.0.0.1", args.port, configuration=config,
                              create_protocol=H3Server)
    grow_buffers(server._transport)
    port = server._transport.get_extra_info("sockname")[1]
    print(f"port {port}", flush=True)
    await asyncio.Future()


# ---- the client ------------------------------------------------------------

# Datagrams the client received (reported on a failure too: a refused
# client gets none).
RECEIVED = [0]


class H3Client(QuicConnectionProtocol):
    def datagram_received(self, data, addr):
        RECEIVED[0] += 1
        super().datagram_received(data, addr)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._h3 = H3Connection(self._quic)
        self._result = None
        self._sid = None

    def get(self, authority, path):
        self._sid = self._quic.get_next_available_stream_id()
        self._result = {"status": None, "length": 0, "hash": hashlib.sha256(),
                        "head": b"", "body": bytearray(), "done": self._loop.create_future()}
        self._h3.send_headers(self._sid, [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", authority.encode()),
            (b":path", path.encode()),
            (b"user-agent", f"quic-peers-test aioquic/{aioquic.__version__}".encode()),
        ], end_stream=True)
        self.transmit()
        return self._result["done"]

    def quic_event_received(self, event):
        if isinstance(event, ConnectionTerminated) and self._result is not None:
            if not self._result["done"].done():
                self._result["done"].set_exception(ConnectionError(
                    f"connection closed: {event.error_code} {event.reason_phrase}"))
        for h3_event in self._h3.handle_event(event):
            result = self._result
            if result is None or getattr(h3_event, "stream_id", None) != self._sid:
                continue
            if isinstance(h3_event, HeadersReceived):
                result["status"] = int(dict(h3_event.headers)[b":status"])
            elif isinstance(h3_event, DataReceived):
                data = h3_event.data
                result["length"] += len(data)
                result["hash"].update(data)
                if len(result["head"]) < 16:
                    result["head"] += data[:16 - len(result["head"])]
                if len(result["body"]) < 65536:
                    result["body"] += data[:65536 - len(result["body"])]
            if getattr(h3_event, "stream_ended", False) and not result["done"].done():
                result["done"].set_result(None)


def initial_crypto_packets(logger):
    """How many Initial packets carrying CRYPTO the client sent."""
    count = 0
    for trace in logger.to_dict()["traces"]:
        for event in trace["events"]:
            data = event["data"]
            if (event["name"].endswith("packet_sent")
                    and data.get("header", {}).get("packet_type") == "initial"
                    and any(f.get("frame_type") == "crypto" for f in data.get("frames", []))):
                count += 1
    return count


async def get(args):
    url = urlparse(args.url)
    port = url.port or 443
    alpn = list(H3_ALPN)
    if args.inflate:
        # 8 names of 200 bytes: a ClientHello of about 1,900 bytes.
        alpn += [f"x-quic-peers-filler-{i}-".ljust(200, "z") for i in range(8)]
    config = QuicConfiguration(is_client=True, alpn_protocols=alpn,
                               server_name=args.server_name or url.hostname,
                               max_data=WINDOW, max_stream_data=WINDOW, idle_timeout=30)
    config.load_verify_locations(args.ca)
    logger = QuicLogger() if args.trace else None
    config.quic_logger = logger
    authority = url.netloc
    path = url.path or "/"
    if url.query:
        path += "?" + url.query
    started = time.monotonic()
    async with connect(args.connect, port, configuration=config,
                       create_protocol=H3Client) as client:
        grow_buffers(client._transport)
        local = client._transport.get_extra_info("sockname")[1]
        hello = client._quic._crypto_streams[tls.Epoch.INITIAL].sender._buffer_stop
        negotiated = client._quic.tls.alpn_negotiated
        await client.get(authority, path)
        result = client._result
    elapsed = time.monotonic() - started
    body = bytes(result["body"])
    out = {
        "aioquic": aioquic.__version__,
        "status": result["status"],
        "length": result["length"],
        "sha256": result["hash"].hexdigest(),
        "first_bytes": result["head"].hex(),
        "body": body.decode(errors="replace") if result["length"] <= 65536 else None,
        "hello_bytes": hello,
        "local_port": local,
        "alpn": negotiated,
        "elapsed_ms": int(elapsed * 1000),
        "datagrams_received": RECEIVED[0],
        "mib_per_s": round(result["length"] / (1 << 20) / elapsed, 1),
    }
    if logger is not None:
        out["initial_crypto_packets"] = initial_crypto_packets(logger)
    return out


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--cert", required=True)
    s.add_argument("--key", required=True)
    s.add_argument("--name", required=True)
    s.add_argument("--port", type=int, default=0)
    g = sub.add_parser("get")
    g.add_argument("url")
    g.add_argument("--ca", required=True)
    g.add_argument("--server-name")
    g.add_argument("--connect", default="127.0.0.1")
    g.add_argument("--inflate", action="store_true")
    g.add_argument("--trace", action="store_true")
    g.add_argument("--timeout", type=float, default=30)
    args = parser.parse_args()
    if args.command == "serve":
        asyncio.run(serve(args))
        return
    try:
        out = asyncio.run(asyncio.wait_for(get(args), args.timeout))
    except (asyncio.TimeoutError, TimeoutError):
        print(json.dumps({"error": f"timeout after {args.timeout}s",
                          "datagrams_received": RECEIVED[0]}))
        sys.exit(1)
    except Exception as err:  # noqa: BLE001  (the test reads the JSON)
        print(json.dumps({"error": f"{type(err).__name__}: {err}",
                          "datagrams_received": RECEIVED[0]}))
        sys.exit(1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
