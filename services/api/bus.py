"""The API's NATS app: what it says on the bus, declared on its FastStream broker.

The API asks the policy for spawn decisions (POST /v1/spawn-checks) and cues the policy
after a grant or revocation commits. `tollgate docs` puts these declarations into
docs/asyncapi.yaml.
"""

from __future__ import annotations

from faststream.nats.publisher.usecase import LogicPublisher
from nats.aio.client import Client

from contracts._base import DEFAULT_PREFIX
from contracts.grants import GrantRecorded, GrantRevoked, grants_subject
from contracts.spawn import SpawnRequest, spawn_check_subject
from infra.broker import TollgateBroker

# Subject parameters in the generated document (see services.meter.app.HOST_MARK).
SCOPE_MARK, TARGET_MARK = "PARAMscope", "PARAMtarget"


class ApiChannels:
    """The API's publishers. Subjects with parameters are given at publish."""

    def __init__(self, broker: TollgateBroker, prefix: str = DEFAULT_PREFIX) -> None:
        self.broker = broker
        self.prefix = prefix
        self.spawn_check: LogicPublisher = broker.publisher(
            spawn_check_subject(prefix),
            schema=SpawnRequest,
            title="api-spawn-check",
            description="POST /v1/spawn-checks asks the policy here (request/reply), with "
            "the caller's `tollgate.spawn_request.v1`; see the `spawn-check` operation.",
            include_in_schema=False,  # the policy's `spawn-check` operation documents it
        )
        self.grants: LogicPublisher = broker.publisher(
            grants_subject(SCOPE_MARK, TARGET_MARK, prefix),
            schema=GrantRecorded | GrantRevoked,
            title="grants",
            description="Published by the API after a grant (`tollgate.grant_recorded.v1`) "
            "or a revocation (`tollgate.grant_revoked.v1`) commits to the hash-chained grants "
            "record in Postgres; the policy reads the record when cued (and polls), so this "
            "is a cue, not the record. Plain NATS (not stored). SPEC addition.",
        )

    @classmethod
    def around(cls, nc: Client, prefix: str = DEFAULT_PREFIX) -> ApiChannels:
        """The channels over a connection the caller owns (tests hand the API theirs)."""
        return cls(TollgateBroker(name="tollgate-api").adopt(nc), prefix)
