"""Test server run inside a test network namespace.

GET /payload  -> PAYLOAD (deterministic bytes, so the client can check them)
GET /echo     -> JSON: the request headers and the client address the server saw
GET /status/NNN[?anything] -> an empty response with status NNN (e.g. 503)
raw TCP port  -> "hello <client ip>\n" then echoes what it reads
Serves IPv4 and IPv6 on every port given: http ports first, then --tcp ports.
"""
import argparse
import json
import random
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PAYLOAD = random.Random(20261126).randbytes(256 * 1024)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/payload":
            body, ctype = PAYLOAD, "application/octet-stream"
        elif self.path == "/echo":
            body = json.dumps({"headers": {k.lower(): v for k, v in self.headers.items()},
                               "client": self.client_address[0].removeprefix("::ffff:")}).encode()
            ctype = "application/json"
        elif self.path.startswith("/status/") and self.path[8:11].isdigit():  # ?query ignored
            self.send_response(int(self.path[8:11]))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


class DualStackHTTP(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        ip = self.client_address[0].removeprefix("::ffff:")
        self.request.sendall(f"hello {ip}\n".encode())
        while data := self.request.recv(65536):
            self.request.sendall(data)


class DualStackTCP(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--http", type=int, action="append", default=[])
    ap.add_argument("--tcp", type=int, action="append", default=[])
    a = ap.parse_args()
    servers = [DualStackHTTP(("::", p), Handler) for p in a.http]
    servers += [DualStackTCP(("::", p), Echo) for p in a.tcp]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
