"""Python client for the beast inference server (docs/PROTOCOL.md).

    from beast import Client, NotFound
    with Client("127.0.0.1:7878") as c:
        p = c.predict("digits", [[0.0] * 64])
        print(p.outputs[0], p.argmax(), p.runs)

    from beast import Cluster            # several nodes (needs `pip install xxhash`)
    with Cluster("10.0.0.1:7878:9464,10.0.0.2:7878:9464") as c:
        p = c.predict("digits", [[0.0] * 64])
        print(p.node, p.argmax())
"""

from beast.client import (FRAME_BYTES_MAX, BadRequest, BeastError, Client, ConnectionClosed,
                          DeadlineExceeded, InternalError, NotFound, Overloaded, Prediction,
                          ProtocolError, Timeout, decode_response, encode_feedback,
                          encode_request)

try:  # the cluster client needs the xxhash package; the plain client does not
    from beast.cluster import Cluster
except ImportError as _e:  # pragma: no cover
    _why = str(_e)

    class Cluster:  # noqa: D101 - says what is missing when used
        def __init__(self, *a, **kw):
            raise ImportError("beast.Cluster needs the xxhash package (pip install xxhash): " + _why)

__all__ = [
    "Cluster",
    "Client", "Prediction", "BeastError", "BadRequest", "NotFound", "Overloaded",
    "DeadlineExceeded", "InternalError", "ProtocolError", "ConnectionClosed", "Timeout",
    "encode_request", "encode_feedback", "decode_response", "FRAME_BYTES_MAX",
]
