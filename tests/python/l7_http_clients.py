"""Python HTTP clients through an mc-proxy L7 route: requests (HTTP/1.1)
and httpx (HTTP/2, httpx[http2]), trusting the route's CA.

Usage: l7_http_clients.py requests|httpx URL CA_FILE
Every `*.test` name resolves to 127.0.0.1 (the proxy on loopback), so the
URL's host is both the SNI and the Host header.
Prints one JSON object {client, status, http_version, body}; exit 0 when
the request completed (whatever its status), 1 on a failure, 3 when the
client library is missing.
"""

import json
import socket
import ssl
import sys

_getaddrinfo = socket.getaddrinfo


def _loopback(host, *args, **kwargs):
    if isinstance(host, str) and host.endswith(".test"):
        host = "127.0.0.1"
    return _getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = _loopback


def with_requests(url, ca):
    try:
        import requests
    except ImportError as err:
        print(f"requests missing: {err}", file=sys.stderr)
        sys.exit(3)
    response = requests.get(url, verify=ca, timeout=30)
    # urllib3 speaks HTTP/1.1 only; raw.version is 11 for HTTP/1.1.
    version = {10: "HTTP/1.0", 11: "HTTP/1.1"}.get(response.raw.version, str(response.raw.version))
    return {"client": f"requests {requests.__version__}", "status": response.status_code,
            "http_version": version, "body": response.text}


def with_httpx(url, ca):
    try:
        import httpx
        import h2  # noqa: F401  (httpx[http2])
    except ImportError as err:
        print(f"httpx[http2] missing: {err}", file=sys.stderr)
        sys.exit(3)
    context = ssl.create_default_context(cafile=ca)
    with httpx.Client(http1=False, http2=True, verify=context, timeout=30) as client:
        response = client.get(url)
        return {"client": f"httpx {httpx.__version__}", "status": response.status_code,
                "http_version": response.http_version, "body": response.text}


def main():
    client, url, ca = sys.argv[1:4]
    result = {"requests": with_requests, "httpx": with_httpx}[client](url, ca)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
