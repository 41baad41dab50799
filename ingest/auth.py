"""API keys: generation, hashing, and the request check (DESIGN §5).

A key is shown once, at creation; only its SHA-256 is stored (keys are long
random strings, so a fast hash is as safe as a slow one and costs nothing per
request). Its first characters, the prefix, name it in listings and
`revoke-key`.
"""
import base64
import binascii
import functools
import hashlib
import secrets

from flask import g, request

from ingest.errors import ApiError
from ingest.logs import bind_context
from models import ApiKey, db

SCOPES = ("ingest", "read")
PREFIX_LENGTH = 12


def hash_key(key):
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_key(organization_id, scopes):
    """Create a key with ``scopes``; returns (plain key, ApiKey row)."""
    unknown = set(scopes) - set(SCOPES)
    if unknown or not scopes:
        raise ValueError("scopes must be among %s" % ", ".join(SCOPES))
    key = "ik_" + secrets.token_urlsafe(32)
    with db.atomic():
        row = ApiKey.create(organization=organization_id, prefix=key[:PREFIX_LENGTH],
                            key_hash=hash_key(key), scopes=",".join(sorted(scopes)))
    return key, row


def revoke_key(prefix):
    """Revoke the live key(s) with this prefix (or whole key); returns how many."""
    return (ApiKey.update(revoked=True)
            .where((ApiKey.prefix == prefix[:PREFIX_LENGTH]) & ~ApiKey.revoked)
            .execute())


def find_key(key):
    """The live ApiKey for a plain key, or None (for anything a client may send)."""
    if not isinstance(key, str) or not key:
        return None
    try:
        key_hash = hash_key(key)
    except UnicodeEncodeError:  # a lone surrogate: no key of ours
        return None
    return ApiKey.select().where((ApiKey.key_hash == key_hash) & ~ApiKey.revoked).first()


def key_from_request():
    """The key from `Authorization: Bearer KEY` or HTTP Basic with KEY as user name."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    scheme, value = scheme.lower(), value.strip()
    if scheme == "bearer":
        return value
    if scheme == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[0]
    return None


def authenticate(scope, key=None):
    """Check the request's key (or ``key``) for ``scope``; sets g.organization_id."""
    api_key = find_key(key or key_from_request())
    if api_key is None:
        raise ApiError(401, "unauthorized", "A valid API key is required.",
                       headers={"WWW-Authenticate": 'Bearer realm="ingest"'})
    if scope not in api_key.scope_set:
        raise ApiError(403, "forbidden", "This key lacks the '%s' scope." % scope)
    g.organization_id = api_key.organization_id
    bind_context(organization_id=str(api_key.organization_id))
    return api_key


def require(scope):
    """Decorator: the view needs a key with ``scope``."""
    def decorator(view):
        @functools.wraps(view)
        def wrapped(*args, **kwargs):
            authenticate(scope)
            return view(*args, **kwargs)
        return wrapped
    return decorator
