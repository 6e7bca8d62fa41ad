//! Map + validate + sign throughput on one core: the CPU cost per message behind every ACK.
//!
//! `cargo bench --bench pipeline`

/// The daemon's allocator (src/main.rs), so the figures are the daemon's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hl7_edge::config::SiteConfig;
use hl7_edge::ingest::adapter;
use hl7_edge::map::MappingSet;
use hl7_edge::pipeline::Processor;
use hl7_edge::sign::SigningKey;

fn bench(c: &mut Criterion) {
    let raw = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/adt_a01_uk.hl7"
    ))
    .expect("fixture");
    let feeds = adapter::load(None, &SiteConfig::default()).expect("embedded feed");
    let feed = &feeds[0];
    let set = MappingSet::embedded().expect("embedded mappings");
    let p = Processor::new(Arc::new(set), SiteConfig::default(), Default::default())
        .expect("processor");
    let (key, _) = SigningKey::generate().expect("key");
    let now = jiff::Timestamp::now();

    let mut g = c.benchmark_group("adt_a01");
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse+map+validate", |b| {
        b.iter(|| black_box(p.bundle(black_box(&raw), feed, now).expect("maps")))
    });
    g.bench_function("parse+map+validate+sign+serialise", |b| {
        b.iter(|| {
            black_box(
                p.signed_bytes(black_box(&raw), feed, now, &key)
                    .expect("signs"),
            )
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
