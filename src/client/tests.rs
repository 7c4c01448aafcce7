//! The client against a fake server on port 0 that answers out of order.

use super::*;
use crate::wire::{decode_request, FrameReader, ResponseHeader, RunInfo, MAX_FRAME_BYTES_DEFAULT};
use std::io::ErrorKind;
use std::net::TcpListener;

const WAIT: Duration = Duration::from_secs(10);

/// A fake server. Per connection it gathers requests into batches of up to
/// 8 (a batch also ends when the socket goes quiet for a few ms) and answers
/// each batch in reverse order. By target:
/// "echo": OK with the input as output; "hold": never answered;
/// "die": close the connection at once; "not_found", "busy", "slow",
/// "bad", "boom": the matching error status, message = target.
fn fake_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            thread::spawn(move || serve(conn));
        }
    });
    addr
}

struct Answer {
    id: u64,
    status: Status,
    message: &'static str,
    rows: u32,
    cols: u32,
    output: Vec<f32>,
}

fn serve(mut conn: TcpStream) {
    conn.set_read_timeout(Some(Duration::from_millis(3)))
        .unwrap();
    let mut frames = FrameReader::new(MAX_FRAME_BYTES_DEFAULT);
    let mut batch: Vec<Answer> = Vec::new();
    let mut enc = Encoder::new();
    let mut out = Vec::new();
    loop {
        let quiet = match frames.read_from(&mut conn) {
            Ok(0) => return,
            Ok(_) => false,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => true,
            Err(_) => return,
        };
        while let Some(body) = frames.next_frame().unwrap() {
            let r = decode_request(body).unwrap();
            let (status, message) = match r.target {
                "echo" => (Status::Ok, ""),
                "hold" => continue,
                "die" => return,
                "not_found" => (Status::NotFound, "not_found"),
                "busy" => (Status::Overloaded, "busy"),
                "slow" => (Status::DeadlineExceeded, "slow"),
                "bad" => (Status::BadRequest, "bad"),
                _ => (Status::Internal, "boom"),
            };
            let ok = status == Status::Ok;
            let mut output = vec![
                0f32;
                if ok {
                    r.input.len() / r.dtype.size()
                } else {
                    0
                }
            ];
            if ok {
                r.read_f32_into(&mut output);
            }
            batch.push(Answer {
                id: r.id,
                status,
                message,
                rows: if ok { r.rows } else { 0 },
                cols: if ok { r.cols } else { 0 },
                output,
            });
        }
        if batch.len() >= 8 || (quiet && !batch.is_empty()) {
            out.clear();
            for a in batch.drain(..).rev() {
                let h = ResponseHeader {
                    id: a.id,
                    status: a.status,
                    message: a.message,
                    rows: a.rows,
                    cols: a.cols,
                    timings: Timings {
                        queue_us: 1,
                        compute_us: 2,
                        total_us: 3,
                    },
                    cached: false,
                    partial: false,
                    ticket: 0,
                };
                let runs = [RunInfo {
                    model: "echo",
                    version: 1,
                    flops: 7,
                }];
                let runs: &[RunInfo] = if a.status == Status::Ok { &runs } else { &[] };
                enc.response(&h, runs, &a.output, &mut out);
            }
            if conn.write_all(&out).is_err() {
                return;
            }
        }
    }
}

fn req<'a>(target: &'a str, x: &'a [f32]) -> RequestSpec<'a> {
    RequestSpec::row(target, x)
}

#[test]
fn client_is_send_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Client>();
    fn assert_send<T: Send>() {}
    assert_send::<Pending>();
}

#[test]
fn client_matches_out_of_order_responses_by_id() {
    let client = Client::connect(fake_server()).unwrap();
    thread::scope(|s| {
        for t in 0..8u32 {
            let client = &client;
            s.spawn(move || {
                // Windows of 16 in flight per thread, 200 requests in all.
                for w in 0..(200 / 16 + 1) {
                    let inputs: Vec<[f32; 3]> = (0..16)
                        .map(|i| w * 16 + i)
                        .filter(|&i| i < 200)
                        .map(|i| [t as f32, i as f32, -(i as f32) * 0.5])
                        .collect();
                    let mut pending: Vec<_> = inputs
                        .iter()
                        .map(|x| client.send(&req("echo", x)).unwrap())
                        .collect();
                    for (x, p) in inputs.iter().zip(pending.iter_mut()) {
                        let id = p.id();
                        let got = p.wait_timeout(WAIT).expect("no response").unwrap();
                        assert_eq!(got.id, id);
                        assert_eq!(got.outputs, x);
                        assert_eq!((got.rows, got.cols), (1, 3));
                        assert_eq!(got.runs, vec![("echo".to_string(), 1, 7)]);
                        assert_eq!(got.timings.total_us, 3);
                    }
                }
            });
        }
    });
    assert_eq!(client.in_flight(), 0);
}

#[test]
fn client_f16_input_round_trips() {
    let client = Client::connect(fake_server()).unwrap();
    let bits: Vec<u16> = [1.5f32, -2.0]
        .iter()
        .map(|&x| half::f16::from_f32(x).to_bits())
        .collect();
    let r = RequestSpec {
        input: Input::F16(&bits),
        rows: 2,
        cols: 1,
        ..req("echo", &[])
    };
    assert_eq!(client.predict(&r).unwrap().outputs, vec![1.5, -2.0]);
}

#[test]
fn client_maps_statuses_to_errors() {
    let client = Client::connect(fake_server()).unwrap();
    let x = [1.0f32];
    let cases = [
        ("not_found", ClientError::NotFound("not_found".into())),
        ("busy", ClientError::Overloaded("busy".into())),
        ("slow", ClientError::DeadlineExceeded("slow".into())),
        ("bad", ClientError::BadRequest("bad".into())),
        ("boom", ClientError::Internal("boom".into())),
    ];
    let pending: Vec<_> = cases
        .iter()
        .map(|(t, _)| client.send(&req(t, &x)).unwrap())
        .collect();
    for ((_, want), mut p) in cases.iter().zip(pending) {
        let got = p.wait_timeout(WAIT).expect("no response");
        assert_eq!(got.as_ref().unwrap_err(), want);
        assert_eq!(got.unwrap_err().status(), want.status());
    }
    // The connection is still good after errors.
    assert_eq!(client.predict(&req("echo", &x)).unwrap().outputs, x);
}

#[test]
fn client_refuses_bad_shape_locally() {
    let client = Client::connect(fake_server()).unwrap();
    let x = [1.0f32, 2.0];
    let bad = RequestSpec {
        rows: 3,
        ..req("echo", &x)
    };
    assert!(matches!(client.send(&bad), Err(ClientError::BadRequest(_))));
    let zero = RequestSpec {
        rows: 0,
        cols: 0,
        ..req("echo", &[])
    };
    assert!(matches!(
        client.send(&zero),
        Err(ClientError::BadRequest(_))
    ));
    assert_eq!(client.in_flight(), 0);
}

#[test]
fn server_closing_mid_flight_fails_every_pending() {
    let client = Client::connect(fake_server()).unwrap();
    let x = [1.0f32];
    let mut held: Vec<_> = (0..50)
        .map(|_| client.send(&req("hold", &x)).unwrap())
        .collect();
    client.send(&req("die", &x)).unwrap();
    for p in &mut held {
        match p
            .wait_timeout(WAIT)
            .expect("pending request hung after close")
        {
            Err(ClientError::Closed(_)) => {}
            other => panic!("want Closed, got {other:?}"),
        }
    }
    // Later sends fail at once (the reader marks the client closed before
    // it completes the pending requests, so this is not racy).
    assert!(matches!(
        client.send(&req("echo", &x)),
        Err(ClientError::Closed(_))
    ));
}

#[test]
fn dropping_pending_frees_its_slot_and_drop_client_joins() {
    let client = Client::connect(fake_server()).unwrap();
    let x = [1.0f32];
    let mut p = client.send(&req("hold", &x)).unwrap();
    assert!(p.wait_timeout(Duration::from_millis(20)).is_none());
    assert_eq!(client.in_flight(), 1);
    drop(p);
    assert_eq!(client.in_flight(), 0);
    let mut p = client.send(&req("hold", &x)).unwrap();
    drop(client); // shuts down and joins the reader: the pending sees Closed
    assert!(matches!(
        p.wait_timeout(WAIT),
        Some(Err(ClientError::Closed(_)))
    ));
}
