#!/usr/bin/env bash
# make devserver: a working local mc-proxy on loopback.
# First run creates ./srv/ with a dev config, a demo CA and certificates for
# demo.test (the backend's) and web.test (mc-proxy's own, for the L7 route);
# every run starts two demo TLS backends (openssl s_server) on 127.0.0.1:18443
# and :18444, and then mc-proxy in the foreground on 127.0.0.1:8443, with two
# routes:
#   demo.test  L4: relayed untouched, the client sees the backend's certificate;
#              a pool of three backends, round robin, checked every 2 s: the
#              two demo backends and 127.0.0.1:18445, where nothing listens
#              (marked down, skipped: `backends list` shows it)
#   web.test   L7: TLS ends in mc-proxy (web.test's certificate), HTTP goes on
#              to the first backend over TLS, verified against the demo CA
# The listener has quic = true: with Python's aioquic installed
# (pip install aioquic==1.7.2), two demo HTTP/3 backends listen on UDP 18443
# and 18444 and demo.test is reachable over QUIC through the same route:
#   python3 tests/python/quic_h3.py get https://demo.test:8443/ --ca srv/certs/ca.pem
# Try it from another terminal:
#   curl --cacert srv/certs/ca.pem --resolve demo.test:8443:127.0.0.1 https://demo.test:8443/
#   curl --cacert srv/certs/ca.pem --resolve web.test:8443:127.0.0.1 https://web.test:8443/ -v
#   openssl s_client -connect 127.0.0.1:8443 -servername demo.test -CAfile srv/certs/ca.pem
#   ./target/debug/mc-proxy routes list -c srv/mc-proxy.toml
#   ./target/debug/mc-proxy backends list -c srv/mc-proxy.toml
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${MC_PROXY_BIN:-./target/debug/mc-proxy}
srv=./srv
certs=$srv/certs

if [ ! -f "$srv/mc-proxy.toml" ]; then
  mkdir -p "$certs"
  chmod 700 "$srv"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -subj "/CN=mc-proxy demo CA" -keyout "$certs/ca.key" -out "$certs/ca.pem" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj "/CN=demo.test" -keyout "$certs/demo.key" -out "$certs/demo.csr" 2>/dev/null
  printf 'subjectAltName=DNS:demo.test,DNS:localhost,IP:127.0.0.1\n' > "$certs/demo.ext"
  openssl x509 -req -in "$certs/demo.csr" -CA "$certs/ca.pem" -CAkey "$certs/ca.key" \
    -CAcreateserial -days 3650 -extfile "$certs/demo.ext" -out "$certs/demo.pem" 2>/dev/null
  # web.test: the L7 route's certificate, served by mc-proxy (chain: leaf, CA).
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj "/CN=web.test" -keyout "$certs/web.key" -out "$certs/web.csr" 2>/dev/null
  printf 'subjectAltName=DNS:web.test\n' > "$certs/web.ext"
  openssl x509 -req -in "$certs/web.csr" -CA "$certs/ca.pem" -CAkey "$certs/ca.key" \
    -CAcreateserial -days 3650 -extfile "$certs/web.ext" -out "$certs/web.leaf.pem" 2>/dev/null
  cat "$certs/web.leaf.pem" "$certs/ca.pem" > "$certs/web.pem"
  cat > "$srv/mc-proxy.toml" <<'TOML'
# Development config written by `make devserver` (paths are relative to this file).
[database]
path = "mc-proxy.db"

[[listeners]]
addr = "127.0.0.1:8443"
# Also UDP 8443: QUIC (HTTP/3) flows routed by SNI to the same routes' backends.
quic = true
  # L4: the TLS stream is relayed untouched to a backend of the pool. No
  # one listens on 18445: the health check marks it down and connections
  # go to the other two (`mc-proxy backends list` shows it).
  [[listeners.routes]]
  hostname = "demo.test"
  backends = ["127.0.0.1:18443", "127.0.0.1:18444", "127.0.0.1:18445"]
  balance  = "round_robin"
  health_interval = "2s"

  # L7: mc-proxy terminates TLS with web.test's certificate and proxies
  # HTTP to the backend over TLS, verifying it against the demo CA.
  [[listeners.routes]]
  hostname = "web.test"
  backend  = "127.0.0.1:18443"
  mode     = "l7"
  tls_cert = "certs/web.pem"
  tls_key  = "certs/web.key"
  backend_tls = true
  backend_ca  = "certs/ca.pem"
  backend_server_name = "demo.test"

[grpc]
addr = "unix:mc-proxy.sock"

[proxy]
connect_timeout  = "1s"
shutdown_timeout = "2s"

[log]
level = "info"
TOML
  echo "devserver: created $srv/ (config, demo CA, demo.test and web.test certificates)"
fi

backends=()
for port in 18443 18444; do
  openssl s_server -accept "127.0.0.1:$port" -cert "$certs/demo.pem" -key "$certs/demo.key" \
    -www -quiet >/dev/null 2>&1 &
  backends+=("$!")
done
quic_demo="off (pip install aioquic==1.7.2 to see demo.test over HTTP/3)"
if python3 -c 'import aioquic' 2>/dev/null; then
  for port in 18443 18444; do
    python3 tests/python/quic_h3.py serve --cert "$certs/demo.pem" --key "$certs/demo.key" \
      --name "h3-$port" --port "$port" >/dev/null 2>&1 &
    backends+=("$!")
  done
  quic_demo="on: HTTP/3 backends on UDP 18443 and 18444"
fi
trap 'kill "${backends[@]}" 2>/dev/null || true' EXIT INT TERM

echo "devserver: demo backends on 127.0.0.1:18443 and :18444, mc-proxy on 127.0.0.1:8443 (Ctrl-C stops all)"
echo "devserver: curl --cacert srv/certs/ca.pem --resolve demo.test:8443:127.0.0.1 https://demo.test:8443/   (L4)"
echo "devserver: curl --cacert srv/certs/ca.pem --resolve web.test:8443:127.0.0.1 https://web.test:8443/    (L7)"
echo "devserver: $bin backends list -c $srv/mc-proxy.toml                              (the pool's health)"
echo "devserver: QUIC $quic_demo"
echo "devserver: python3 tests/python/quic_h3.py get https://demo.test:8443/ --ca srv/certs/ca.pem   (HTTP/3, QUIC passthrough)"
"$bin" server -c "$srv/mc-proxy.toml"
