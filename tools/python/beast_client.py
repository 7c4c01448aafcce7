"""Minimal blocking beast client in Python: the example from docs/PROTOCOL.md.

Needs `pip install flatbuffers==25.12.19` and the generated package next to
this file (tools/python/beast/wire, written by scripts/gen-flatbuffers.sh).

    python tools/python/beast_client.py HOST:PORT TARGET 0.1 0.2 0.3
    python tools/python/beast_client.py --selftest
"""

import socket
import struct
import sys

import flatbuffers

from beast.wire import Body, CacheControl, DType, Feedback, Message, Policy, Request, Response, Status

STATUS_NAMES = {v: k for k, v in vars(Status.Status).items() if not k.startswith("_")}


def encode_request(req_id, target, rows, cols, values, deadline_us=0, domain=None,
                   policy=Policy.Policy.Default):
    """One whole frame (u32 LE length + body) for f32 `values` (row-major).
    `policy` overrides an ensemble's member selection (docs/SELECTION.md)."""
    b = flatbuffers.Builder(256)
    # Children first: flatbuffers builds back to front.
    target_off = b.CreateString(target)
    domain_off = b.CreateString(domain) if domain else None
    input_off = b.CreateByteVector(struct.pack("<%df" % len(values), *values))
    Request.Start(b)
    Request.AddId(b, req_id)
    Request.AddTarget(b, target_off)
    Request.AddRows(b, rows)
    Request.AddCols(b, cols)
    Request.AddDtype(b, DType.DType.F32)
    Request.AddInput(b, input_off)
    Request.AddDeadlineUs(b, deadline_us)
    if domain_off is not None:
        Request.AddDomain(b, domain_off)
    Request.AddCache(b, CacheControl.CacheControl.Use)
    Request.AddPolicy(b, policy)
    req = Request.End(b)
    Message.Start(b)
    Message.AddBodyType(b, Body.Body.Request)
    Message.AddBody(b, req)
    b.Finish(Message.End(b))
    body = b.Output()
    return struct.pack("<I", len(body)) + body


def encode_feedback(req_id, ticket, label):
    """One whole frame: the true `label` of the answer that carried `ticket`.
    Send it on the connection that got the answer (docs/PROTOCOL.md)."""
    b = flatbuffers.Builder(64)
    Feedback.Start(b)
    Feedback.AddId(b, req_id)
    Feedback.AddTicket(b, ticket)
    Feedback.AddLabel(b, label)
    fb = Feedback.End(b)
    Message.Start(b)
    Message.AddBodyType(b, Body.Body.Feedback)
    Message.AddBody(b, fb)
    b.Finish(Message.End(b))
    body = b.Output()
    return struct.pack("<I", len(body)) + body


def decode_response(body):
    """A dict for one frame body that holds a Response."""
    msg = Message.Message.GetRootAs(body, 0)
    if msg.BodyType() != Body.Body.Response:
        raise ValueError("not a Response")
    r = Response.Response()
    r.Init(msg.Body().Bytes, msg.Body().Pos)
    raw = bytes(r.Output(j) for j in range(r.OutputLength()))  # or OutputAsNumpy()
    return {
        "id": r.Id(),
        "status": STATUS_NAMES.get(r.Status(), r.Status()),
        "message": (r.Message() or b"").decode(),
        "rows": r.Rows(),
        "cols": r.Cols(),
        "output": list(struct.unpack("<%df" % (len(raw) // 4), raw)),
        "total_us": r.TotalUs(),
        "cached": r.Cached(),
        "partial": r.Partial(),
        "ticket": r.Ticket(),
        "runs": [(r.Runs(i).Model().decode(), r.Runs(i).Version()) for i in range(r.RunsLength())],
    }


def read_frame(sock, max_frame=64 << 20):
    header = _read_exact(sock, 4)
    (n,) = struct.unpack("<I", header)
    if n == 0 or n > max_frame:
        raise ValueError("bad frame length %d" % n)
    return _read_exact(sock, n)


def _read_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk
    return bytes(buf)


def predict_many(addr, target, rows_of_values):
    """Pipeline one request per row on one connection; match answers by id."""
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        frames = [encode_request(i, target, 1, len(v), v) for i, v in enumerate(rows_of_values)]
        s.sendall(b"".join(frames))
        answers = {}
        while len(answers) < len(frames):
            resp = decode_response(read_frame(s))
            answers[resp["id"]] = resp  # may arrive in any order
        return [answers[i] for i in range(len(frames))]


def selftest():
    # The worked example of docs/PROTOCOL.md, as the Rust encoder writes it.
    rust_hex = (
        "60000000 0c000000 08000e00 07000800 08000000 00000001 18000000 00001200"
        "1c001400 04000000 08000c00 00001000 12000000 24000000 01000000 02000000"
        "0c000000 01000000 00000000 08000000 0000803f 00000040 04000000 64656d6f"
        "00000000"
    )
    frame = bytes.fromhex(rust_hex.replace(" ", ""))
    msg = Message.Message.GetRootAs(frame[4:], 0)
    assert msg.BodyType() == Body.Body.Request
    req = Request.Request()
    req.Init(msg.Body().Bytes, msg.Body().Pos)
    assert (req.Id(), req.Target(), req.Rows(), req.Cols()) == (1, b"demo", 1, 2)
    raw = bytes(req.Input(j) for j in range(req.InputLength()))
    assert struct.unpack("<2f", raw) == (1.0, 2.0)
    # And our own encoder produces a frame the same reader accepts.
    ours = encode_request(1, "demo", 1, 2, [1.0, 2.0])
    assert struct.unpack("<I", ours[:4])[0] == len(ours) - 4
    fb = encode_feedback(9, (1 << 48) | 5, 3)
    msg = Message.Message.GetRootAs(fb[4:], 0)
    assert msg.BodyType() == Body.Body.Feedback
    f = Feedback.Feedback()
    f.Init(msg.Body().Bytes, msg.Body().Pos)
    assert (f.Id(), f.Ticket(), f.Label()) == (9, (1 << 48) | 5, 3)
    print("selftest ok")


if __name__ == "__main__":
    if sys.argv[1:] == ["--selftest"]:
        selftest()
    else:
        addr, target, *vals = sys.argv[1:]
        print(predict_many(addr, target, [[float(v) for v in vals]])[0])
