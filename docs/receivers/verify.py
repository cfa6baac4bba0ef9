"""Verify the Standard Webhooks signature eventworker sends (Python standard library only).

As a check: WEBHOOK_SECRET=whsec_... WEBHOOK_ID=... WEBHOOK_TIMESTAMP=... \
WEBHOOK_SIGNATURE=... python3 verify.py < body   (exit status 0 when valid).
"""
import base64
import hashlib
import hmac
import os
import sys
import time


def verify(secret, msg_id, timestamp, signature_header, body, tolerance=300):
    """True when `body` (bytes, exactly as received) was signed with `secret`."""
    if secret.startswith("whsec_"):
        key = base64.b64decode(secret[len("whsec_"):])
    else:
        key = secret.encode()
    try:
        sent = int(timestamp)
    except ValueError:
        return False
    if abs(time.time() - sent) > tolerance:  # too old (or from the future): a replay
        return False
    signed = msg_id.encode() + b"." + timestamp.encode() + b"." + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    # Several signatures ("v1,<sig> v1,<sig>") may come while a secret is rotated.
    for candidate in signature_header.split():
        version, _, sig = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(sig, expected):
            return True
    return False


if __name__ == "__main__":
    env = os.environ
    valid = verify(env["WEBHOOK_SECRET"], env["WEBHOOK_ID"], env["WEBHOOK_TIMESTAMP"],
                   env["WEBHOOK_SIGNATURE"], sys.stdin.buffer.read())
    sys.exit(0 if valid else 1)
