//! Load generator: sends N HL7 messages over C MLLP connections and reports throughput and ACK
//! latency; optionally also counts the Bundles that reach an MQTT broker (end-to-end rate).
//!
//! ```sh
//! cargo run --release --example loadgen -- --addr 127.0.0.1:2575 -n 20000 -c 8 \
//!     [--file tests/fixtures/adt_a01_uk.hl7] [--mqtt 127.0.0.1:1883 --topic 'hl7-edge/#']
//! ```
//!
//! Every message gets a unique MSH-10 (so duplicate detection never drops one). Each connection
//! sends one message and waits for its ACK before the next, as MLLP senders do.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Args {
    addr: SocketAddr,
    messages: usize,
    connections: usize,
    file: String,
    mqtt: Option<SocketAddr>,
    topic: String,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        addr: "127.0.0.1:2575".parse().map_err(|e| format!("{e}"))?,
        messages: 10_000,
        connections: 8,
        file: "tests/fixtures/adt_a01_uk.hl7".into(),
        mqtt: None,
        topic: "hl7-edge/#".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or_else(|| format!("{k} needs a value"));
        match k.as_str() {
            "--addr" => a.addr = v()?.parse().map_err(|e| format!("--addr: {e}"))?,
            "-n" | "--messages" => a.messages = v()?.parse().map_err(|e| format!("-n: {e}"))?,
            "-c" | "--connections" => {
                a.connections = v()?.parse().map_err(|e| format!("-c: {e}"))?
            }
            "--file" => a.file = v()?,
            "--mqtt" => a.mqtt = Some(v()?.parse().map_err(|e| format!("--mqtt: {e}"))?),
            "--topic" => a.topic = v()?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.connections == 0 || a.messages == 0 {
        return Err("-n and -c must be positive".into());
    }
    Ok(a)
}

/// The template message split around MSH-10, so each send only formats the control id.
struct Template {
    before: Vec<u8>,
    after: Vec<u8>,
}

fn template(bytes: &[u8]) -> Result<Template, String> {
    // MSH-10 is the 9th '|' after "MSH" (MSH-1 is the separator itself).
    let mut bars = bytes
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'|')
        .map(|(i, _)| i);
    let start = bars.nth(8).ok_or("the template has no MSH-10")? + 1;
    let end = bytes[start..]
        .iter()
        .position(|b| *b == b'|')
        .map(|p| start + p)
        .ok_or("the template's MSH-10 is not followed by MSH-11")?;
    Ok(Template {
        before: bytes[..start].to_vec(),
        after: bytes[end..].to_vec(),
    })
}

async fn sender(
    addr: SocketAddr,
    t: Arc<Template>,
    ids: std::ops::Range<usize>,
    run: u64,
) -> Result<(Vec<Duration>, usize), String> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut lat = Vec::with_capacity(ids.len());
    let mut not_aa = 0;
    let mut buf = vec![0u8; 4096];
    let mut frame = Vec::with_capacity(t.before.len() + t.after.len() + 32);
    for i in ids {
        frame.clear();
        frame.push(0x0b);
        frame.extend_from_slice(&t.before);
        frame.extend_from_slice(format!("L{run:x}-{i}").as_bytes());
        frame.extend_from_slice(&t.after);
        frame.extend_from_slice(&[0x1c, 0x0d]);
        let t0 = Instant::now();
        s.write_all(&frame)
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut ack = Vec::new();
        loop {
            let n = s.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("connection closed by the server".into());
            }
            ack.extend_from_slice(&buf[..n]);
            if ack.ends_with(&[0x1c, 0x0d]) {
                break;
            }
        }
        lat.push(t0.elapsed());
        if !ack.windows(7).any(|w| w == b"MSA|AA|" || w == b"MSA|CA|") {
            not_aa += 1;
        }
    }
    Ok((lat, not_aa))
}

async fn count_deliveries(
    addr: SocketAddr,
    topic: String,
    want: usize,
    ready: tokio::sync::oneshot::Sender<()>,
) -> Result<Instant, String> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut opts = MqttOptions::new(
        format!("loadgen-{}", std::process::id()),
        addr.ip().to_string(),
        addr.port(),
    );
    opts.set_max_packet_size(16 * 1024 * 1024, 16 * 1024 * 1024);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut ev) = AsyncClient::new(opts, 1024);
    client
        .subscribe(&topic, QoS::AtLeastOnce)
        .await
        .map_err(|e| e.to_string())?;
    let mut ready = Some(ready);
    let mut got = 0;
    loop {
        match ev.poll().await {
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
            }
            Ok(Event::Incoming(Packet::Publish(_))) => {
                got += 1;
                if got >= want {
                    return Ok(Instant::now());
                }
            }
            Ok(_) => {}
            Err(e) => return Err(format!("mqtt: {e}")),
        }
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(2);
        }
    };
    let bytes = match std::fs::read(&args.file) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("loadgen: {}: {e}", args.file);
            std::process::exit(2);
        }
    };
    let t = match template(&bytes) {
        Ok(t) => Arc::new(t),
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(2);
        }
    };
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);

    let deliveries = match args.mqtt {
        Some(m) => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let h = tokio::spawn(count_deliveries(m, args.topic.clone(), args.messages, tx));
            let _ = rx.await;
            Some(h)
        }
        None => None,
    };

    let per = args.messages / args.connections;
    let extra = args.messages % args.connections;
    let start = Instant::now();
    let mut tasks = Vec::new();
    let mut next = 0;
    for c in 0..args.connections {
        let n = per + usize::from(c < extra);
        tasks.push(tokio::spawn(sender(
            args.addr,
            t.clone(),
            next..next + n,
            run,
        )));
        next += n;
    }
    let mut lat = Vec::with_capacity(args.messages);
    let mut not_aa = 0;
    for task in tasks {
        match task.await {
            Ok(Ok((l, n))) => {
                lat.extend(l);
                not_aa += n;
            }
            Ok(Err(e)) => eprintln!("loadgen: a connection failed: {e}"),
            Err(e) => eprintln!("loadgen: a sender task failed: {e}"),
        }
    }
    let acked_in = start.elapsed();
    lat.sort();
    println!(
        "connections={} messages={} acked={} not_accepted={} ack_rate={:.0}/s p50={:.2}ms p99={:.2}ms max={:.2}ms",
        args.connections,
        args.messages,
        lat.len(),
        not_aa,
        lat.len() as f64 / acked_in.as_secs_f64(),
        pct(&lat, 0.50).as_secs_f64() * 1e3,
        pct(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    if let Some(h) = deliveries {
        match tokio::time::timeout(Duration::from_secs(600), h).await {
            Ok(Ok(Ok(done))) => println!(
                "delivered={} end_to_end_rate={:.0}/s (first send to last Bundle on the broker)",
                args.messages,
                args.messages as f64 / done.duration_since(start).as_secs_f64()
            ),
            Ok(Ok(Err(e))) => eprintln!("loadgen: counting deliveries failed: {e}"),
            Ok(Err(e)) => eprintln!("loadgen: delivery task failed: {e}"),
            Err(_) => eprintln!("loadgen: not every Bundle arrived within 600 s"),
        }
    }
}
