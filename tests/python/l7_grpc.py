"""Real Python grpcio (gRPC C-core) on both sides of an mc-proxy L7 route.

  l7_grpc.py serve
      A plaintext (h2c) server of l7_echo.proto on 127.0.0.1, port chosen by
      the kernel. Prints "port N", then one JSON event per line: each call
      ({"event": "call", "method", "xff", "user_agent"}) and each call the
      client cancelled ({"event": "cancelled", "method"}).
  l7_grpc.py call ADDR HOST CA_FILE
      Calls every method over TLS to ADDR (the proxy) with HOST as SNI and
      :authority, trusting CA_FILE; prints one JSON object of the results.

Stubs are generated at run time from l7_echo.proto with grpcio-tools.
Exit 3 when grpcio or grpcio-tools is missing, 1 on an unexpected failure.
"""

import importlib
import json
import os
import sys
import tempfile
import threading
import time

try:
    import grpc
    from grpc_tools import protoc
except ImportError as err:  # the Rust test skips or, strict, fails on 3
    print(f"grpcio or grpcio-tools missing: {err}", file=sys.stderr)
    sys.exit(3)

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 20
_print_lock = threading.Lock()


def stubs(out_dir):
    rc = protoc.main([
        "grpc_tools.protoc", f"-I{HERE}", f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}", os.path.join(HERE, "l7_echo.proto"),
    ])
    if rc != 0:
        raise SystemExit(f"protoc failed with {rc}")
    sys.path.insert(0, out_dir)
    return importlib.import_module("l7_echo_pb2"), importlib.import_module("l7_echo_pb2_grpc")


def event(**fields):
    with _print_lock:
        print(json.dumps(fields), flush=True)


def serve(pb2, pb2_grpc):
    from concurrent import futures

    def seen(method, context):
        metadata = dict(context.invocation_metadata())
        event(event="call", method=method, xff=metadata.get("x-forwarded-for"),
              user_agent=metadata.get("user-agent"))

    class Echo(pb2_grpc.EchoServicer):
        def Say(self, request, context):
            seen("Say", context)
            return pb2.Msg(text="echo: " + request.text)

        def Count(self, request, context):
            seen("Count", context)
            for i in range(request.n):
                yield pb2.Msg(text=str(i))

        def Collect(self, request_iterator, context):
            seen("Collect", context)
            return pb2.Msg(text=",".join(m.text for m in request_iterator))

        def Chat(self, request_iterator, context):
            seen("Chat", context)
            for m in request_iterator:
                yield pb2.Msg(text="re: " + m.text)

        def Missing(self, request, context):
            seen("Missing", context)
            context.set_trailing_metadata((("x-detail", "kept"),))
            context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

        def Slow(self, request, context):
            seen("Slow", context)
            until = time.monotonic() + request.ms / 1000
            while time.monotonic() < until:
                if not context.is_active():
                    event(event="cancelled", method="Slow")
                    return pb2.Msg()
                time.sleep(0.02)
            return pb2.Msg(text="slept")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb2_grpc.add_EchoServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"port {port}", flush=True)
    server.wait_for_termination()


def call(pb2, pb2_grpc, addr, host, ca):
    with open(ca, "rb") as f:
        credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
    options = [("grpc.ssl_target_name_override", host), ("grpc.default_authority", host),
               ("grpc.primary_user_agent", "l7-peers-test")]
    result = {"grpcio": grpc.__version__}
    with grpc.secure_channel(addr, credentials, options=options) as channel:
        echo = pb2_grpc.EchoStub(channel)
        result["say"] = echo.Say(pb2.Msg(text="hello"), timeout=TIMEOUT).text
        result["count"] = [m.text for m in echo.Count(pb2.CountRequest(n=5), timeout=TIMEOUT)]
        result["collect"] = echo.Collect(iter([pb2.Msg(text=t) for t in "abc"]),
                                         timeout=TIMEOUT).text
        result["chat"] = [m.text for m in echo.Chat(iter([pb2.Msg(text=t) for t in ["x", "y"]]),
                                                    timeout=TIMEOUT)]
        try:
            echo.Missing(pb2.Msg(text="?"), timeout=TIMEOUT)
            result["missing"] = "answered"
        except grpc.RpcError as err:
            result["missing"] = {"code": err.code().name, "details": err.details(),
                                 "trailers": dict(err.trailing_metadata() or ())}
        started = time.monotonic()
        try:
            echo.Slow(pb2.SlowRequest(ms=10000), timeout=0.5)
            result["slow"] = "answered"
        except grpc.RpcError as err:
            result["slow"] = {"code": err.code().name,
                              "elapsed_ms": int((time.monotonic() - started) * 1000)}
        # The channel still works after the deadline.
        result["after"] = echo.Say(pb2.Msg(text="again"), timeout=TIMEOUT).text
    print(json.dumps(result))


def main():
    with tempfile.TemporaryDirectory() as out_dir:
        pb2, pb2_grpc = stubs(out_dir)
        if sys.argv[1] == "serve":
            serve(pb2, pb2_grpc)
        else:
            call(pb2, pb2_grpc, *sys.argv[2:5])


if __name__ == "__main__":
    try:
        main()
    except grpc.RpcError as err:
        print(f"call failed: {err.code()}: {err.details()}", file=sys.stderr)
        sys.exit(1)
