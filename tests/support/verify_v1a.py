"""Verifies a Standard Webhooks `v1a` (ed25519) signature with PyNaCl (libsodium), as a receiver
would: an implementation capy-webhooks did not write.

usage: verify_v1a.py WHPK_PUBLIC_KEY WEBHOOK_ID WEBHOOK_TIMESTAMP WEBHOOK_SIGNATURE < body
Exit 0 when one `v1a,` signature of the header verifies over `{id}.{timestamp}.{body}`, 1 when
none does (other schemes' signatures in the header are skipped), 2 on a malformed key.
"""

import base64
import sys

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey


def main() -> int:
    public_key, msg_id, timestamp, header = sys.argv[1:5]
    if not public_key.startswith("whpk_"):
        print("the public key does not start with whpk_", file=sys.stderr)
        return 2
    key = VerifyKey(base64.b64decode(public_key[len("whpk_"):], validate=True))
    body = sys.stdin.buffer.read()
    content = f"{msg_id}.{timestamp}.".encode() + body
    for part in header.split(" "):
        version, _, signature = part.partition(",")
        if version != "v1a":
            continue
        try:
            key.verify(content, base64.b64decode(signature, validate=True))
            return 0
        except BadSignatureError:
            pass
    print("no v1a signature verifies", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
