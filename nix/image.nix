# Distroless OCI image: the static binary, a CA bundle, passwd/group for the
# non-root user and an empty /srv/mc-proxy. No shell, no libc.
#
#   nix build .#image && podman load < result
{
  lib,
  dockerTools,
  cacert,
  writeTextDir,
  mc-proxy,
}:

let
  uid = "65532";
  gid = "65532";
  passwd = writeTextDir "etc/passwd" ''
    root:x:0:0:root:/:/sbin/nologin
    mcproxy:x:${uid}:${gid}:mc-proxy:/srv/mc-proxy:/sbin/nologin
  '';
  group = writeTextDir "etc/group" ''
    root:x:0:
    mcproxy:x:${gid}:
  '';
in
dockerTools.buildLayeredImage {
  name = "mc-proxy";
  tag = mc-proxy.version;

  # mc-proxy's bin/ is linked to /bin, so `mc-proxy status` works in exec
  # probes with PATH=/bin.
  contents = [
    mc-proxy
    cacert
    passwd
    group
  ];

  # Runs under fakeroot in the image root: the state directory belongs to
  # the runtime user, so a fresh volume initialised from it is writable.
  fakeRootCommands = ''
    mkdir -p ./srv/mc-proxy
    chown ${uid}:${gid} ./srv/mc-proxy
    chmod 0700 ./srv/mc-proxy
  '';

  config = {
    Entrypoint = [ "${mc-proxy}/bin/mc-proxy" ];
    Cmd = [
      "server"
      "-c"
      "/srv/mc-proxy/mc-proxy.toml"
    ];
    User = "${uid}:${gid}";
    WorkingDir = "/srv/mc-proxy";
    Volumes = {
      "/srv/mc-proxy" = { };
    };
    Env = [
      "PATH=/bin"
      "SSL_CERT_FILE=${cacert}/etc/ssl/certs/ca-bundle.crt"
      "MC_PROXY_CONFIG=/srv/mc-proxy/mc-proxy.toml"
    ];
    StopSignal = "SIGTERM";
    Labels = {
      "org.opencontainers.image.title" = "mc-proxy";
      "org.opencontainers.image.version" = mc-proxy.version;
      "org.opencontainers.image.licenses" = "MIT OR Apache-2.0";
      "org.opencontainers.image.source" = "https://example.invalid/mc-proxy";
    };
  };

  # Fixed creation date: the image is a pure function of its inputs.
  created = "1970-01-01T00:00:01Z";
}
