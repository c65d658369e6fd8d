"""Real Python grpcio (gRPC C-core) against mc-proxy's admin Unix socket,
with the channel's default options: grpc.insecure_channel("unix:" + PATH).

Since gRPC 1.57 C-core sends the percent-encoded socket path as :authority,
which the server's HTTP/2 layer refused before the authority shim.

Usage: grpc_unix_interop.py SOCKET LISTENER_ADDR HOSTNAME BACKEND
Prints one JSON object with what the server answered; exit 0 when every
call succeeded, 1 on a failed call, 3 when grpcio/grpcio-tools are missing.

Stubs are generated at run time from proto/ with grpcio-tools; the health
service is called through grpc's generic unary_unary with hand-serialised
messages (grpc.health.v1 HealthCheckRequest{service} = field 1, string).
"""

import importlib
import json
import os
import sys
import tempfile

try:
    import grpc
    from grpc_tools import protoc
except ImportError as err:  # the Rust test skips or, strict, fails on 3
    print(f"grpcio or grpcio-tools missing: {err}", file=sys.stderr)
    sys.exit(3)

PROTO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto")
TIMEOUT = 10


def stubs(out_dir):
    """Generates mc_proxy/v1/admin_pb2{,_grpc}.py into out_dir and imports them."""
    well_known = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main([
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        os.path.join(PROTO_DIR, "mc_proxy", "v1", "admin.proto"),
    ])
    if rc != 0:
        raise SystemExit(f"protoc failed with {rc}")
    sys.path.insert(0, out_dir)
    return (importlib.import_module("mc_proxy.v1.admin_pb2"),
            importlib.import_module("mc_proxy.v1.admin_pb2_grpc"))


def health_request(service):
    name = service.encode()
    return (b"\x0a" + bytes([len(name)]) + name) if name else b""


def health_status(raw):
    # HealthCheckResponse{status = 1 (enum)}: tag 0x08 then a varint;
    # an empty message is UNKNOWN (0).
    if raw == b"":
        return 0
    if len(raw) != 2 or raw[0] != 0x08:
        raise ValueError(f"unexpected HealthCheckResponse bytes {raw!r}")
    return raw[1]


def main():
    socket, listener, hostname, backend = sys.argv[1:5]
    result = {"grpcio": grpc.__version__}
    with tempfile.TemporaryDirectory() as out_dir:
        pb2, pb2_grpc = stubs(out_dir)
        with grpc.insecure_channel("unix:" + socket) as channel:
            admin = pb2_grpc.ProxyAdminServiceStub(channel)
            status = admin.GetStatus(pb2.GetStatusRequest(), timeout=TIMEOUT)
            result["version"] = status.version
            result["listeners"] = [l.addr for l in status.listeners]

            added = admin.AddRoute(pb2.AddRouteRequest(route=pb2.Route(
                listener_addr=listener, hostname=hostname, backend=backend)), timeout=TIMEOUT)
            result["created"] = added.created

            routes = admin.ListRoutes(pb2.ListRoutesRequest(listener_addr=listener),
                                      timeout=TIMEOUT)
            result["routes"] = [[r.listener_addr, r.hostname, r.backend] for r in routes.routes]

            check = channel.unary_unary("/grpc.health.v1.Health/Check")
            result["health"] = {
                service or "(server)": health_status(check(health_request(service), timeout=TIMEOUT))
                for service in ["", "mc_proxy.v1.ProxyAdminService"]
            }
    print(json.dumps(result))


if __name__ == "__main__":
    try:
        main()
    except grpc.RpcError as err:
        print(f"call failed: {err.code()}: {err.details()}", file=sys.stderr)
        sys.exit(1)
