"""Python client for the beast inference server (docs/PROTOCOL.md).

    from beast import Client, NotFound
    with Client("127.0.0.1:7878") as c:
        p = c.predict("digits", [[0.0] * 64])
        print(p.outputs[0], p.argmax(), p.runs)
"""

from beast.client import (FRAME_BYTES_MAX, BadRequest, BeastError, Client, ConnectionClosed,
                          DeadlineExceeded, InternalError, NotFound, Overloaded, Prediction,
                          ProtocolError, Timeout, decode_response, encode_feedback,
                          encode_request)

__all__ = [
    "Client", "Prediction", "BeastError", "BadRequest", "NotFound", "Overloaded",
    "DeadlineExceeded", "InternalError", "ProtocolError", "ConnectionClosed", "Timeout",
    "encode_request", "encode_feedback", "decode_response", "FRAME_BYTES_MAX",
]
