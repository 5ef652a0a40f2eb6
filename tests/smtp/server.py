#!/usr/bin/python3
"""A real SMTP server for the tests, on aiosmtpd (Debian's python3-aiosmtpd).

Listens on 127.0.0.1 on a free port, prints `port N`, then one JSON line per
message received: envelope, decoded headers, plain-text body, the raw
message, and whether TLS and AUTH were used.

Options:
  --starttls CERT KEY   offer STARTTLS with this certificate
  --tls CERT KEY        TLS from the first byte (SMTPS)
  --auth USER:PASSWORD  require AUTH with these credentials
"""
import argparse
import asyncio
import email
import email.policy
import json
import ssl
import sys

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


class Handler:
    async def handle_DATA(self, server, session, envelope):
        raw = envelope.original_content or envelope.content
        if isinstance(raw, str):
            raw = raw.encode("utf-8")
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        part = msg.get_body(("plain",)) if msg.is_multipart() else msg
        print(
            json.dumps(
                {
                    "mail_from": envelope.mail_from,
                    "rcpt_tos": envelope.rcpt_tos,
                    "from": str(msg["From"]),
                    "to": str(msg["To"]),
                    "subject": str(msg["Subject"]),
                    "content_type": msg.get_content_type(),
                    "body": part.get_content(),
                    "raw": raw.decode("utf-8", "replace"),
                    "tls": session.ssl is not None
                    or server.transport.get_extra_info("sslcontext") is not None,
                    "authenticated": bool(session.authenticated),
                }
            ),
            flush=True,
        )
        return "250 OK"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--starttls", nargs=2, metavar=("CERT", "KEY"))
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    parser.add_argument("--auth")
    args = parser.parse_args()

    def context(cert, key):
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        return ctx

    kwargs = {"hostname": "localhost"}
    if args.starttls:
        kwargs["tls_context"] = context(*args.starttls)
        kwargs["require_starttls"] = True
    if args.auth:
        user, password = args.auth.split(":", 1)

        def authenticate(server, session, envelope, mechanism, data):
            ok = (
                isinstance(data, LoginPassword)
                and data.login.decode() == user
                and data.password.decode() == password
            )
            return AuthResult(success=ok)

        kwargs["authenticator"] = authenticate
        kwargs["auth_required"] = True
        kwargs["auth_require_tls"] = bool(args.starttls)
    server_ssl = context(*args.tls) if args.tls else None

    async def serve():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(Handler(), **kwargs), "127.0.0.1", 0, ssl=server_ssl
        )
        print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
        await server.serve_forever()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
