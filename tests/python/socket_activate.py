#!/usr/bin/env python3
"""Socket activation as systemd does it, for tests (tests/activation.rs).

    socket_activate.py --listen HOST:PORT [--listen ...] --template T --config C
                       --ports P -- COMMAND ARGS...

Binds and listens on each --listen address (port 0: any free port), writes
the config C from the template T with {port0}, {port1}, ... replaced by the
bound ports, writes the ports (one line, space-separated) to P, then execs
COMMAND with the sockets as descriptors 3, 4, ... and LISTEN_FDS, LISTEN_PID
(this process's pid, which exec keeps) and LISTEN_FDNAMES set, as systemd
passes a .socket unit's sockets.
"""
import os
import socket
import sys


def main():
    args = sys.argv[1:]
    listens, options = [], {}
    while args and args[0] != "--":
        flag, value = args[0], args[1]
        args = args[2:]
        if flag == "--listen":
            listens.append(value)
        else:
            options[flag] = value
    command = args[1:]
    sockets = []
    for address in listens:
        host, port = address.rsplit(":", 1)
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        sock.listen(128)
        sockets.append(sock)
    ports = [s.getsockname()[1] for s in sockets]
    with open(options["--template"]) as f:
        text = f.read()
    for i, port in enumerate(ports):
        text = text.replace("{port%d}" % i, str(port))
    with open(options["--config"], "w") as f:
        f.write(text)
    with open(options["--ports"], "w") as f:
        f.write(" ".join(map(str, ports)) + "\n")
    # Move every socket out of the way first, then down to 3, 4, ...
    high = [os.dup(s.fileno()) for s in sockets]
    for s in sockets:
        s.close()
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i, inheritable=True)
    for fd in high:
        if fd >= 3 + len(high):
            os.close(fd)
    os.environ["LISTEN_FDS"] = str(len(sockets))
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ["LISTEN_FDNAMES"] = ":".join("listener%d" % i for i in range(len(sockets)))
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
