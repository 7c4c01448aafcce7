"""A blocking beast client that follows docs/PROTOCOL.md.

- One TCP connection (TCP_NODELAY), many requests in flight on it: `send`
  returns the request's id at once, `wait(id)` returns its answer; answers
  may arrive in any order and are matched by id. `predict_many` pipelines a
  list of requests this way.
- Ids start at 1 and increase (the server answers an unreadable body with id 0).
- Every wait has a timeout (`timeout=` per call, else the client's); on a
  timeout `Timeout` is raised and the connection is closed, since the
  answer could still arrive later and the stream's position is unknown.
- A status other than OK raises its own exception class (`BadRequest`,
  `NotFound`, `Overloaded`, `DeadlineExceeded`, `InternalError`), all
  subclasses of `BeastError`; a closed connection raises `ConnectionClosed`,
  a frame or body that cannot be read raises `ProtocolError`.
"""

import socket
import struct
import time

import flatbuffers

from beast.wire import (Body, CacheControl, DType, Feedback, Message, Policy, Request,
                        Response, Status)

__all__ = [
    "Client", "Prediction", "BeastError", "BadRequest", "NotFound", "Overloaded",
    "DeadlineExceeded", "InternalError", "ProtocolError", "ConnectionClosed", "Timeout",
    "FRAME_BYTES_MAX",
]

# The server's default frame limit; a client rejects longer frames from the server.
FRAME_BYTES_MAX = 64 << 20


class BeastError(Exception):
    """Any error of this client. `status` is the wire status (None when the
    error is not an answer of the server), `id` the request's id if known."""
    status = None

    def __init__(self, message, id=None):
        super().__init__(message)
        self.message = message
        self.id = id


class BadRequest(BeastError):
    """The request is wrong (shape, width, NaN, unknown field value): fix it, do not retry."""
    status = Status.Status.BAD_REQUEST


class NotFound(BeastError):
    """No such target or version, or a feedback ticket that is unknown or spent."""
    status = Status.Status.NOT_FOUND


class Overloaded(BeastError):
    """The server shed the request: retry later with backoff."""
    status = Status.Status.OVERLOADED


class DeadlineExceeded(BeastError):
    """The request's deadline ran out: retry only with a larger budget."""
    status = Status.Status.DEADLINE_EXCEEDED


class InternalError(BeastError):
    """A server-side failure: a retry may succeed."""
    status = Status.Status.INTERNAL


class ProtocolError(BeastError):
    """The server sent something this client cannot read (the connection is closed)."""


class ConnectionClosed(BeastError):
    """The connection closed before the answer came (requests in flight are lost)."""


class Timeout(BeastError):
    """No answer within the timeout (the connection is closed)."""


_ERRORS = {c.status: c for c in (BadRequest, NotFound, Overloaded, DeadlineExceeded, InternalError)}

_POLICIES = {None: Policy.Policy.Default, "default": Policy.Policy.Default, "all": Policy.Policy.All,
             "cascade": Policy.Policy.Cascade, "deadline": Policy.Policy.Deadline,
             "bandit": Policy.Policy.Bandit}

_CACHE = {"use": CacheControl.CacheControl.Use, "bypass": CacheControl.CacheControl.Bypass,
          "refresh": CacheControl.CacheControl.Refresh}


class Prediction:
    """One answer: `outputs` is a list of rows (each a list of `cols` floats);
    `node` is the node that answered (set by `Cluster`, else None)."""

    __slots__ = ("id", "rows", "cols", "outputs", "cached", "partial", "ticket", "runs",
                 "queue_us", "compute_us", "total_us", "node")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)

    def argmax(self):
        """The index of the largest output of each row."""
        return [max(range(len(r)), key=r.__getitem__) for r in self.outputs]

    def __repr__(self):
        return "Prediction(id=%d, rows=%d, cols=%d, outputs=%r, runs=%r)" % (
            self.id, self.rows, self.cols, self.outputs, self.runs)


def _rows_of(inputs):
    """(rows, cols, flat list of floats) from a list of rows, one row, or a 2-D numpy array."""
    if hasattr(inputs, "tolist"):  # numpy, without importing it
        inputs = inputs.tolist()
    inputs = list(inputs)
    if not inputs:
        raise BadRequest("no rows to send")
    if not isinstance(inputs[0], (list, tuple)):
        inputs = [inputs]
    cols = len(inputs[0])
    flat = []
    for i, r in enumerate(inputs):
        if len(r) != cols:
            raise BadRequest("row %d has %d values, row 0 has %d" % (i, len(r), cols))
        flat.extend(float(v) for v in r)
    return len(inputs), cols, flat


def encode_request(req_id, target, inputs, version=None, deadline_us=None, domain=None,
                   policy=None, cache="use", f16=False):
    """One whole frame (u32 LE length + body) for a Request."""
    rows, cols, flat = _rows_of(inputs)
    if policy not in _POLICIES:
        raise BadRequest("unknown policy %r (default, all, cascade, deadline, bandit)" % (policy,))
    if cache not in _CACHE:
        raise BadRequest("unknown cache control %r (use, bypass, refresh)" % (cache,))
    b = flatbuffers.Builder(64 + 4 * len(flat))
    target_off = b.CreateString(target)
    domain_off = b.CreateString(domain) if domain else None
    fmt = "<%d%s" % (len(flat), "e" if f16 else "f")
    input_off = b.CreateByteVector(struct.pack(fmt, *flat))
    Request.Start(b)
    Request.AddId(b, req_id)
    Request.AddTarget(b, target_off)
    if version is not None:
        Request.AddVersion(b, version)
    Request.AddRows(b, rows)
    Request.AddCols(b, cols)
    Request.AddDtype(b, DType.DType.F16 if f16 else DType.DType.F32)
    Request.AddInput(b, input_off)
    if deadline_us:
        Request.AddDeadlineUs(b, deadline_us)
    if domain_off is not None:
        Request.AddDomain(b, domain_off)
    Request.AddCache(b, _CACHE[cache])
    Request.AddPolicy(b, _POLICIES[policy])
    req = Request.End(b)
    return _message(b, Body.Body.Request, req)


def encode_feedback(req_id, ticket, label):
    """One whole frame for a Feedback: the true `label` of the answer that carried `ticket`."""
    b = flatbuffers.Builder(64)
    Feedback.Start(b)
    Feedback.AddId(b, req_id)
    Feedback.AddTicket(b, ticket)
    Feedback.AddLabel(b, label)
    return _message(b, Body.Body.Feedback, Feedback.End(b))


def _message(b, body_type, body):
    Message.Start(b)
    Message.AddBodyType(b, body_type)
    Message.AddBody(b, body)
    b.Finish(Message.End(b))
    out = b.Output()
    return struct.pack("<I", len(out)) + out


def decode_response(body):
    """(id, status, message, Prediction or None) for one frame body."""
    try:
        msg = Message.Message.GetRootAs(body, 0)
        if msg.BodyType() != Body.Body.Response:
            raise ProtocolError("the server sent a message that is not a Response")
        r = Response.Response()
        r.Init(msg.Body().Bytes, msg.Body().Pos)
        status, rid = r.Status(), r.Id()
        message = (r.Message() or b"").decode("utf-8", "replace")
        if status != Status.Status.OK:
            return rid, status, message, None
        raw = r.OutputAsNumpy().tobytes() if not r.OutputIsNone() else b""
        vals = struct.unpack("<%df" % (len(raw) // 4), raw)
        rows, cols = r.Rows(), r.Cols()
        if rows * cols != len(vals):
            raise ProtocolError("response %d: %d values for %d x %d" % (rid, len(vals), rows, cols))
        runs = [(r.Runs(i).Model().decode(), r.Runs(i).Version(), r.Runs(i).Flops())
                for i in range(r.RunsLength())]
        p = Prediction(id=rid, rows=rows, cols=cols,
                       outputs=[list(vals[i * cols:(i + 1) * cols]) for i in range(rows)],
                       cached=bool(r.Cached()), partial=bool(r.Partial()), ticket=r.Ticket(),
                       runs=runs, queue_us=r.QueueUs(), compute_us=r.ComputeUs(),
                       total_us=r.TotalUs(), node=None)
        return rid, status, message, p
    except BeastError:
        raise
    except Exception as e:  # a body flatbuffers cannot read
        raise ProtocolError("cannot read a response: %s" % e)


class Client:
    """A connection to a beast server. Not thread-safe: use one per thread
    (or a lock); pipeline with `send`/`wait` or `predict_many`."""

    def __init__(self, addr, timeout=10.0, connect_timeout=5.0):
        host, port = addr.rsplit(":", 1) if isinstance(addr, str) else addr
        self.timeout = timeout
        self._sock = socket.create_connection((host.strip("[]"), int(port)), timeout=connect_timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._next_id = 1
        self._buf = bytearray()
        self._done = {}  # id -> (status, message, Prediction), answers read before asked for
        self._in_flight = set()

    # -- sending

    def _take_id(self):
        rid = self._next_id
        self._next_id += 1
        return rid

    def send(self, target, inputs, **kw):
        """Send one request without waiting; returns its id (see `encode_request` for kw)."""
        rid = self._take_id()
        frame = encode_request(rid, target, inputs, **kw)
        self._send(frame)
        self._in_flight.add(rid)
        return rid

    def send_feedback(self, ticket, label):
        """Send the true label of the answer that carried `ticket`; returns its id."""
        rid = self._take_id()
        self._send(encode_feedback(rid, ticket, label))
        self._in_flight.add(rid)
        return rid

    def _send(self, frame):
        if self._sock is None:
            raise ConnectionClosed("the connection is closed")
        try:
            self._sock.sendall(frame)
        except OSError as e:
            self.close()
            raise ConnectionClosed("send failed: %s" % e)

    # -- receiving

    def wait(self, rid, timeout=None):
        """The answer to request `rid`: a Prediction, or its typed error raised."""
        if rid not in self._in_flight and rid not in self._done:
            raise BeastError("request %d is not in flight on this connection" % rid, rid)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while rid not in self._done:
            got, status, message, p = self._read_one(deadline, rid)
            self._in_flight.discard(got)
            self._done[got] = (status, message, p)
        status, message, p = self._done.pop(rid)
        if status == Status.Status.OK:
            return p
        cls = _ERRORS.get(status)
        if cls is None:
            self.close()
            raise ProtocolError("unknown status %d: %s" % (status, message), rid)
        raise cls(message, rid)

    def _read_one(self, deadline, waiting_for):
        while True:
            if len(self._buf) >= 4:
                (n,) = struct.unpack_from("<I", self._buf)
                if n == 0 or n > FRAME_BYTES_MAX:
                    self.close()
                    raise ProtocolError("bad frame length %d from the server" % n)
                if len(self._buf) >= 4 + n:
                    body = bytes(self._buf[4:4 + n])
                    del self._buf[:4 + n]
                    try:
                        return decode_response(body)
                    except ProtocolError:
                        self.close()
                        raise
            if self._sock is None:
                raise ConnectionClosed("the connection is closed", waiting_for)
            left = deadline - time.monotonic()
            if left <= 0:
                self.close()
                raise Timeout("no answer to request %d in time (connection closed)" % waiting_for,
                              waiting_for)
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(1 << 16)
            except socket.timeout:
                continue
            except OSError as e:
                self.close()
                raise ConnectionClosed("receive failed: %s" % e, waiting_for)
            if not chunk:
                self.close()
                raise ConnectionClosed("the server closed the connection", waiting_for)
            self._buf += chunk

    # -- one call

    def predict(self, target, inputs, timeout=None, **kw):
        """Send one request and wait for its answer."""
        return self.wait(self.send(target, inputs, **kw), timeout)

    def predict_many(self, requests, timeout=None):
        """Pipeline `requests` (each `(target, inputs)` or `(target, inputs, kw)`) on
        this connection and return their answers in order; an error answer is
        returned as its exception object rather than raised, so that one bad
        request does not hide the others' answers."""
        ids = [self.send(r[0], r[1], **(r[2] if len(r) > 2 else {})) for r in requests]
        out = []
        for rid in ids:
            try:
                out.append(self.wait(rid, timeout))
            except (BadRequest, NotFound, Overloaded, DeadlineExceeded, InternalError) as e:
                out.append(e)
        return out

    def feedback(self, ticket, label, timeout=None):
        """Send feedback and wait for its acknowledgement (raises NotFound for a spent ticket)."""
        self.wait(self.send_feedback(ticket, label), timeout)

    def close(self):
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
