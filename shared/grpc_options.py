"""gRPC channel and server options that both ends must agree on, defined once.

Keepalive only works as a matched pair (reference/ecosystem.md, section C): a client
that pings more often than the server permits gets ``GOAWAY too_many_pings`` and loses
its connection mid-download.  So the client pings every :data:`CLIENT_KEEPALIVE_TIME_MS`
(60 s, under the ~4 min idle cut of cloud load balancers) and the server accepts pings
down to :data:`SERVER_MIN_PING_INTERVAL_MS` (30 s), half the client's period, so
jitter never counts as a strike.  Both permit pings without calls, because a site may
sit idle between fetch and adaptation.

Message sizes are small on purpose: weights are streamed in chunks of at most
:data:`MAX_CHUNK_BYTES`, so no legitimate message needs more than
:data:`MAX_MESSAGE_BYTES`, and a peer cannot make either side allocate more.
"""

from __future__ import annotations

KIB = 1024
MIB = 1024 * KIB

MIN_CHUNK_BYTES = 64 * KIB
MAX_CHUNK_BYTES = 1 * MIB
DEFAULT_CHUNK_BYTES = 256 * KIB
MAX_MESSAGE_BYTES = 4 * MIB  # one max chunk plus framing, with room to spare

CLIENT_KEEPALIVE_TIME_MS = 60_000
CLIENT_KEEPALIVE_TIMEOUT_MS = 20_000
SERVER_KEEPALIVE_TIME_MS = 120_000
SERVER_KEEPALIVE_TIMEOUT_MS = 20_000
SERVER_MIN_PING_INTERVAL_MS = 30_000

UNARY_DEADLINE_S = 30.0
"""Deadline for GetManifest, GetBatchNormStats and health checks."""
STREAM_DEADLINE_S = 600.0
"""Deadline for one FetchWeights stream; an interrupted fetch resumes from its offset."""

AUTH_METADATA_KEY = "authorization"
"""Metadata key of the per-site bearer token (value ``Bearer <token>``)."""

GrpcOptions = list[tuple[str, int | str]]


def _message_size_options() -> GrpcOptions:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]


def server_options() -> GrpcOptions:
    """Options for ``grpc.server``: small messages, and keepalive paired with :func:`client_options`."""
    return [
        *_message_size_options(),
        ("grpc.keepalive_time_ms", SERVER_KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", SERVER_KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", SERVER_MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 2),
    ]


def client_options() -> GrpcOptions:
    """Options for a client channel: small messages, and keepalive the server accepts."""
    return [
        *_message_size_options(),
        ("grpc.keepalive_time_ms", CLIENT_KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", CLIENT_KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
