#!/usr/bin/env bash
# make devserver: a working local mc-proxy on loopback.
# First run creates ./srv/ with a dev config, a demo CA and a certificate for
# demo.test; every run starts a demo TLS backend (openssl s_server) on
# 127.0.0.1:18443 and then mc-proxy in the foreground on 127.0.0.1:8443.
# Try it from another terminal:
#   curl --cacert srv/certs/ca.pem --resolve demo.test:8443:127.0.0.1 https://demo.test:8443/
#   openssl s_client -connect 127.0.0.1:8443 -servername demo.test -CAfile srv/certs/ca.pem
#   ./target/debug/mc-proxy routes list -c srv/mc-proxy.toml
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
  cat > "$srv/mc-proxy.toml" <<'TOML'
# Development config written by `make devserver` (paths are relative to this file).
[database]
path = "mc-proxy.db"

[[listeners]]
addr = "127.0.0.1:8443"
  [[listeners.routes]]
  hostname = "demo.test"
  backend  = "127.0.0.1:18443"

[grpc]
addr = "unix:mc-proxy.sock"

[proxy]
shutdown_timeout = "2s"

[log]
level = "info"
TOML
  echo "devserver: created $srv/ (config, demo CA, demo.test certificate)"
fi

openssl s_server -accept 127.0.0.1:18443 -cert "$certs/demo.pem" -key "$certs/demo.key" \
  -www -quiet >/dev/null 2>&1 &
backend=$!
trap 'kill "$backend" 2>/dev/null || true' EXIT INT TERM

echo "devserver: demo backend on 127.0.0.1:18443, mc-proxy on 127.0.0.1:8443 (Ctrl-C stops both)"
echo "devserver: curl --cacert srv/certs/ca.pem --resolve demo.test:8443:127.0.0.1 https://demo.test:8443/"
"$bin" server -c "$srv/mc-proxy.toml"
