use super::Ring;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Run `f` on a fresh glommio executor with a ring (tick 2 ms).
fn on_ring<F, Fut>(f: F)
where
    F: FnOnce(std::rc::Rc<Ring>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(64 << 10)
        .spawn(move || async move {
            let ring = match Ring::start(Duration::from_millis(2)) {
                Ok(r) => r,
                Err(e) => {
                    println!("SKIP: no io_uring with DEFER_TASKRUN here: {e}");
                    return;
                }
            };
            f(ring.clone()).await;
            ring.stop();
        })
        .unwrap()
        .join()
        .unwrap();
}

fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    (a, b)
}

#[test]
fn data_sent_while_the_shard_is_idle_wakes_it_and_arrives_in_order() {
    let (peer, ours) = pair();
    let (go, went) = std::sync::mpsc::channel::<()>();
    // The peer writes each piece only once the shard waits for it, so
    // every piece arrives at an idle ring (the eventfd path).
    let writer = std::thread::spawn(move || {
        let mut peer = peer;
        for i in 0..20u8 {
            went.recv().unwrap();
            peer.write_all(&[i; 100]).unwrap();
        }
        peer
    });
    on_ring(move |ring| async move {
        let fd = ours.as_raw_fd();
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        for _ in 0..20 {
            go.send(()).unwrap();
            let mut want = 100;
            while want > 0 {
                let n = ring.recv(fd, &mut buf, None).await.unwrap();
                assert!(n > 0);
                got.extend_from_slice(&buf[..n]);
                want -= n;
            }
        }
        let expect: Vec<u8> = (0..20u8).flat_map(|i| [i; 100]).collect();
        assert_eq!(got, expect);
        drop(ours);
    });
    drop(writer.join().unwrap());
}

#[test]
fn a_lost_eventfd_wakeup_delays_a_receive_by_a_tick_only() {
    let (peer, ours) = pair();
    let (go, went) = std::sync::mpsc::channel::<()>();
    let writer = std::thread::spawn(move || {
        let mut peer = peer;
        went.recv().unwrap();
        // Let the shard go idle on its receive first.
        std::thread::sleep(Duration::from_millis(20));
        peer.write_all(b"late").unwrap();
        peer
    });
    on_ring(move |ring| async move {
        ring.lose_eventfd_wakeups();
        let mut buf = [0u8; 16];
        go.send(()).unwrap();
        let t = Instant::now();
        let got = futures_lite::future::or(
            async { Some(ring.recv(ours.as_raw_fd(), &mut buf, None).await) },
            async {
                glommio::timer::sleep(Duration::from_secs(5)).await;
                None
            },
        )
        .await;
        let Some(r) = got else {
            panic!("data that arrived at an idle ring without its eventfd wake-up never came")
        };
        assert_eq!(&buf[..r.unwrap()], b"late");
        assert!(t.elapsed() < Duration::from_secs(5));
    });
    drop(writer.join().unwrap());
}

#[test]
fn a_receive_past_its_deadline_ends_timed_out() {
    let (peer, ours) = pair();
    on_ring(move |ring| async move {
        let mut buf = [0u8; 16];
        let t = Instant::now();
        let r = ring
            .recv(
                ours.as_raw_fd(),
                &mut buf,
                Some(t + Duration::from_millis(30)),
            )
            .await;
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::TimedOut);
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(30), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
    });
    drop(peer);
}

#[test]
fn a_dropped_receive_is_cancelled_and_the_next_one_gets_the_bytes() {
    let (mut peer, ours) = pair();
    on_ring(move |ring| async move {
        let fd = ours.as_raw_fd();
        {
            let mut buf = vec![0u8; 64];
            let mut op = Box::pin(ring.recv(fd, &mut buf, None));
            // Poll it once (submitted and waiting), then drop it: the drop
            // cancels and waits for the kernel to let go of `buf`.
            let polled = futures_lite::future::poll_once(&mut op).await;
            assert!(polled.is_none());
            drop(op);
            drop(buf);
        }
        peer.write_all(b"after").unwrap();
        let mut buf = [0u8; 64];
        let n = ring.recv(fd, &mut buf, None).await.unwrap();
        assert_eq!(&buf[..n], b"after");
    });
}

#[test]
fn a_send_larger_than_the_socket_buffers_completes_while_the_peer_reads() {
    let (peer, ours) = pair();
    let total = 8 << 20;
    let reader = std::thread::spawn(move || {
        let mut peer = peer;
        let mut got = vec![0u8; total];
        peer.read_exact(&mut got).unwrap();
        got
    });
    on_ring(move |ring| async move {
        let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
        ring.send_all(ours.as_raw_fd(), &data, Duration::from_secs(10))
            .await
            .unwrap();
    });
    let got = reader.join().unwrap();
    assert!(got.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
}

#[test]
fn a_send_the_peer_never_reads_ends_timed_out() {
    let (peer, ours) = pair();
    on_ring(move |ring| async move {
        let data = vec![7u8; 32 << 20];
        let r = ring
            .send_all(ours.as_raw_fd(), &data, Duration::from_millis(50))
            .await;
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::TimedOut);
    });
    drop(peer);
}

#[test]
fn many_connections_whose_data_arrives_at_once_all_complete() {
    // More arrivals than one enter runs (the kernel runs a bounded number
    // of deferred completions per enter): none may be left waiting.
    let n = 200;
    let pairs: Vec<(TcpStream, TcpStream)> = (0..n).map(|_| pair()).collect();
    let (peers, ours): (Vec<_>, Vec<_>) = pairs.into_iter().unzip();
    let (go, went) = std::sync::mpsc::channel::<()>();
    let writer = std::thread::spawn(move || {
        went.recv().unwrap();
        for (i, mut p) in peers.iter().enumerate() {
            p.write_all(&[i as u8; 8]).unwrap();
        }
        peers
    });
    on_ring(move |ring| async move {
        let deadline = Some(Instant::now() + Duration::from_secs(20));
        let mut bufs = vec![[0u8; 8]; ours.len()];
        let ops = ours
            .iter()
            .zip(bufs.iter_mut())
            .map(|(s, b)| ring.recv(s.as_raw_fd(), b, deadline));
        let mut pending: Vec<_> = ops.map(Box::pin).collect();
        // Every receive is queued; let the driver submit them, then write.
        futures_lite::future::yield_now().await;
        futures_lite::future::yield_now().await;
        go.send(()).unwrap();
        for op in pending.iter_mut() {
            assert_eq!(op.as_mut().await.unwrap(), 8);
        }
        drop(pending);
        for (i, b) in bufs.iter().enumerate() {
            assert_eq!(b, &[i as u8; 8]);
        }
    });
    drop(writer.join().unwrap());
}
