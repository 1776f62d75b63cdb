#!/usr/bin/python3
"""A real SMTP server for mailpipe's end-to-end tests, built on aiosmtpd.

It speaks plain SMTP, STARTTLS (required, with AUTH only after TLS) or implicit TLS, can
require AUTH, and answers scripted faults so tests can drive the worker's retry paths:
- recipients whose local part starts with "reject5xx" get "550 5.1.1" at RCPT;
- recipients whose local part starts with "deferonce" get "451 4.2.1" at RCPT the first
  time each is seen, and are accepted after that;
- a fault set through the control API answers every DATA with the given code, or with
  {"drop": true} stores the message and cuts the connection before replying to its dot;
- --delay-ms holds each DATA reply (a slow provider, for shutdown tests).
It offers PIPELINING (RFC 2920), as the providers' servers do, unless --no-pipelining.

Every accepted message is appended to the --store FILE as one JSON line, written out
before the 250 is sent, so a test counting after a kill or a restart misses nothing the
client was told was accepted; tests read that file.

Control API (HTTP on 127.0.0.1): POST /fault {"code": 451, "text": "..."} or
{"drop": true}, DELETE /fault; GET /connections {"open": N, "peak": M} (the most
connections open at once since the start or the last POST /connections/reset).
On start it prints one JSON line: {"smtp_port": N, "control_port": M}.
"""
import argparse
import asyncio
import json
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

LOCK = threading.Lock()
DEFERRED = set()
FAULT = {"code": None, "text": "", "drop": False}
OPEN = set()
PEAK = {"peak": 0}


class CountingSMTP(SMTP):
    """Counts open connections (by protocol instance, which STARTTLS keeps)."""

    def connection_made(self, transport):
        with LOCK:
            OPEN.add(id(self))
            PEAK["peak"] = max(PEAK["peak"], len(OPEN))
        super().connection_made(transport)

    def connection_lost(self, exc):
        with LOCK:
            OPEN.discard(id(self))
        super().connection_lost(exc)


class Handler:
    def __init__(self, delay_ms, store, pipelining):
        self.delay = delay_ms / 1000.0
        self.store = store
        self.pipelining = pipelining

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        # aiosmtpd reads commands one after the other from its buffer, so it serves
        # pipelined commands in order; it only does not say so.
        session.host_name = hostname
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@")[0]
        if local.startswith("reject5xx"):
            return "550 5.1.1 mailbox unavailable"
        if local.startswith("deferonce"):
            with LOCK:
                first = address not in DEFERRED
                DEFERRED.add(address)
            if first:
                return "451 4.2.1 mailbox busy, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.delay:
            await asyncio.sleep(self.delay)
        with LOCK:
            code, text, drop = FAULT["code"], FAULT["text"], FAULT["drop"]
            if code is None:
                message = {
                    "mail_from": envelope.mail_from,
                    "rcpt_tos": list(envelope.rcpt_tos),
                    "data": envelope.content.decode("utf-8", "replace"),
                }
                self.store.write(json.dumps(message) + "\n")
                self.store.flush()
        if code is not None:
            return f"{code} {text}"
        if drop:
            server.transport.abort()
        return "250 Message accepted for delivery"


class Authenticator:
    def __init__(self, user, password):
        self.user, self.password = user.encode(), password.encode()

    def __call__(self, server, session, envelope, mechanism, auth_data):
        ok = isinstance(auth_data, LoginPassword) and \
            auth_data.login == self.user and auth_data.password == self.password
        if ok:
            return AuthResult(success=True)
        # handled=False lets aiosmtpd answer 535; handled=True would leave the client hanging.
        return AuthResult(success=False, handled=False)


class Control(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path != "/connections":
            return self.reply(404, {"error": "not found"})
        with LOCK:
            body = {"open": len(OPEN), "peak": PEAK["peak"]}
        self.reply(200, body)

    def do_POST(self):
        if self.path == "/connections/reset":
            with LOCK:
                PEAK["peak"] = len(OPEN)
            return self.reply(200, {"open": len(OPEN), "peak": PEAK["peak"]})
        if self.path != "/fault":
            return self.reply(404, {"error": "not found"})
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with LOCK:
            if body.get("drop"):
                FAULT["drop"] = True
            else:
                FAULT["code"], FAULT["text"] = int(body["code"]), body.get("text", "fault")
        self.reply(200, FAULT)

    def do_DELETE(self):
        with LOCK:
            FAULT["code"], FAULT["drop"] = None, False
        self.reply(200, FAULT)


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--control-port", type=int, default=0)
    parser.add_argument("--tls", choices=["none", "starttls", "implicit"], default="none")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--auth", help="user:password; AUTH is then required")
    parser.add_argument("--delay-ms", type=int, default=0)
    parser.add_argument("--no-pipelining", action="store_true")
    parser.add_argument("--store", required=True, help="append each accepted message to this file")
    args = parser.parse_args()

    context = None
    if args.tls != "none":
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.cert, args.key)
    authenticator = None
    if args.auth:
        user, password = args.auth.split(":", 1)
        authenticator = Authenticator(user, password)

    store = open(args.store, "a", encoding="utf-8")

    def factory():
        options = dict(hostname="mailpipe-test-smtp", data_size_limit=10 * 1024 * 1024)
        if authenticator:
            options.update(authenticator=authenticator, auth_required=True,
                           auth_require_tls=args.tls == "starttls")
        if args.tls == "starttls":
            options.update(tls_context=context, require_starttls=True)
        return CountingSMTP(Handler(args.delay_ms, store, not args.no_pipelining), **options)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        factory, "127.0.0.1", args.port,
        ssl=context if args.tls == "implicit" else None, reuse_address=True)
    port = server.sockets[0].getsockname()[1]
    control = ThreadingHTTPServer(("127.0.0.1", args.control_port), Control)
    threading.Thread(target=control.serve_forever, daemon=True).start()
    print(json.dumps({"smtp_port": port, "control_port": control.server_address[1]}), flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
