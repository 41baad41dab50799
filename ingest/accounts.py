"""Organizations and their API keys: creation and revocation (DESIGN §5, §10).

The CLI, the tests and the benchmarks create tenants through this one module.
A key is shown once, at creation; only its SHA-256 is stored (keys are long
random strings, so a fast hash is as safe as a slow one and costs nothing per
request). Its first characters, the prefix, name it in listings and
`revoke-key`.
"""
import secrets
from enum import StrEnum

from ingest.auth import hash_key
from models import ApiKey, Organization, db


class Scope(StrEnum):
    """What a key may do: send interactions, or read them (the read API and the feed)."""
    INGEST = "ingest"
    READ = "read"

PREFIX_LENGTH = 12


def create_key(organization_id, scopes):
    """Create a key with ``scopes``; returns (plain key, ApiKey row)."""
    unknown = set(scopes) - set(Scope)
    if unknown or not scopes:
        raise ValueError("scopes must be among %s" % ", ".join(Scope))
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


def new_organization(name):
    """An organization with an ingest key and a read key; keys are returned once."""
    with db.atomic():
        return new_keys(Organization.create(name=name).id)


def new_keys(organization_id):
    """A new ingest key and read key for an organization; keys are returned once."""
    with db.atomic():
        return {"organizationId": str(organization_id),
                "ingestKey": create_key(organization_id, [Scope.INGEST])[0],
                "readKey": create_key(organization_id, [Scope.READ])[0]}
