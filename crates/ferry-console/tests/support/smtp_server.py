"""A real SMTP server for the console's alert test (aiosmtpd, Debian's python3-aiosmtpd).

It requires STARTTLS and AUTH (LOGIN or PLAIN, accepted only after STARTTLS) with one
user, so a mail it accepts proves the console used both. Each accepted mail is printed
as one JSON line on stdout: sender, recipients, subject, body, the TLS version and the
authenticated user.

usage: smtp_server.py PORT CERT KEY USER PASSWORD
"""

import email
import json
import signal
import ssl
import sys

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

port, cert, key, user, password = sys.argv[1:6]


class Handler:
    async def handle_DATA(self, server, session, envelope):
        msg = email.message_from_bytes(envelope.content)
        tls = None
        if session.ssl is not None:
            obj = session.ssl.get("ssl_object")
            tls = obj.version() if obj is not None else "yes"
        print(
            json.dumps(
                {
                    "from": envelope.mail_from,
                    "to": envelope.rcpt_tos,
                    "subject": msg["Subject"],
                    "body": msg.get_payload(decode=True).decode("utf-8", "replace"),
                    "tls": tls,
                    "user": session.auth_data.login.decode() if session.auth_data else None,
                }
            ),
            flush=True,
        )
        return "250 OK"


def authenticator(server, session, envelope, mechanism, auth_data):
    ok = (
        isinstance(auth_data, LoginPassword)
        and auth_data.login.decode() == user
        and auth_data.password.decode() == password
    )
    return AuthResult(success=ok, auth_data=auth_data)


ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(cert, key)
controller = Controller(
    Handler(),
    hostname="127.0.0.1",
    port=int(port),
    tls_context=ctx,
    require_starttls=True,
    authenticator=authenticator,
    auth_required=True,
    auth_require_tls=True,
)
controller.start()
print("READY", flush=True)
signal.sigwait([signal.SIGTERM, signal.SIGINT])
controller.stop()
