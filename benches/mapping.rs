//! Mapping throughput: one ADT^A01 (about 1.6 KB, 16 segments) through the shipped mappings.
//!
//! - `parse_map_json`: charset, parse, route, map, envelope, serialise to JSON bytes: what the
//!   issue-5 target (>= 30,000 messages per second on one core) measures.
//! - `parse_map_validate_json`: the same plus the FHIR R4 and London profile validation the
//!   pipeline runs before signing, for context.
//! - `stage_*`: the stages on their own. `floor_resources_copy`: copying and dropping the mapped
//!   resources' trees, the least any mapper that builds them as a tree pays, rules aside.
//!   With `stage_charset_parse`, `stage_envelope` and `stage_json` it gives the cost of
//!   `parse_map_json` before a single rule runs (README, Performance).
//!
//! Run: `cargo bench --bench mapping` (criterion runs on one thread).

/// The daemon's allocator (src/main.rs), so the figures are the daemon's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hl7_edge::config::SiteConfig;
use hl7_edge::fhir::envelope::{self, EnvelopeInput};
use hl7_edge::hl7;
use hl7_edge::ingest::adapter;
use hl7_edge::map::{MappingSet, RunContext};
use hl7_edge::pipeline::Processor;

const MESSAGE: &[u8] = include_bytes!("adt_a01_large.hl7");

fn bench(c: &mut Criterion) {
    let set = MappingSet::embedded().unwrap_or_else(|e| panic!("shipped mappings: {e:?}"));
    let site = SiteConfig {
        ods_code: "RRV".into(),
        ..SiteConfig::default()
    };
    let tz = jiff::tz::TimeZone::get(&site.timezone).expect("zone");
    let feeds = adapter::load(None, &SiteConfig::default()).expect("embedded feed");
    let feed = &feeds[0];
    let received = jiff::Timestamp::from_second(1_784_000_000).expect("time");

    let one = |set: &MappingSet| -> Vec<u8> {
        let (text, encoding) =
            hl7::decode_to_utf8(MESSAGE, feed.fallback_encoding()).expect("charset");
        let msg = hl7::parse(&text).expect("parse");
        let cx = RunContext {
            site: &site,
            tz: &tz,
            feed: &feed.name,
            feed_variables: None,
            clock_change: Default::default(),
            encoding,
        };
        let mapped = set.map(&msg, &cx, &feed.mappings).expect("map");
        let input = envelope_input(&site, &tz, &msg, received);
        hl7_edge::fhir::json::to_vec(&envelope::assemble(&input, mapped))
    };
    // The benchmark message must map completely (every resource), or the figure means nothing:
    // MessageHeader, sender and GP Organizations, Patient, 3 Practitioners (GP, 2 attending),
    // Location, Encounter, 2 RelatedPerson (NK1), 3 AllergyIntolerance (AL1), 2 Condition (DG1),
    // 3 Observation (OBX), Provenance.
    let bundle: serde_json::Value = serde_json::from_slice(&one(&set)).expect("bundle");
    assert_eq!(
        bundle["entry"].as_array().map(Vec::len),
        Some(20),
        "{bundle}"
    );

    let mut g = c.benchmark_group("adt_a01");
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse_map_json", |b| {
        b.iter(|| black_box(one(black_box(&set))))
    });

    // The stages on their own, to see where the time goes.
    let (text, encoding) = hl7::decode_to_utf8(MESSAGE, feed.fallback_encoding()).expect("charset");
    let msg = hl7::parse(&text).expect("parse");
    let cx = RunContext {
        site: &site,
        tz: &tz,
        feed: &feed.name,
        feed_variables: None,
        clock_change: Default::default(),
        encoding,
    };
    g.bench_function("stage_charset_parse", |b| {
        b.iter(|| {
            let (text, _) =
                hl7::decode_to_utf8(black_box(MESSAGE), feed.fallback_encoding()).expect("charset");
            black_box(hl7::parse(&text).expect("parse"))
        })
    });
    g.bench_function("stage_map", |b| {
        b.iter(|| black_box(set.map(black_box(&msg), &cx, &feed.mappings).expect("map")))
    });
    let mapped = set.map(&msg, &cx, &feed.mappings).expect("map");
    let input = envelope_input(&site, &tz, &msg, received);
    g.bench_function("stage_envelope_json", |b| {
        b.iter(|| {
            let m = hl7_edge::map::MapResult {
                resources: mapped.resources.clone(),
                focus: mapped.focus.clone(),
                sender: mapped.sender,
                ..Default::default()
            };
            black_box(hl7_edge::fhir::json::to_vec(&envelope::assemble(&input, m)))
        })
    });
    let tree = envelope::assemble(&input, set.map(&msg, &cx, &feed.mappings).expect("map"));
    g.bench_function("stage_json", |b| {
        b.iter(|| black_box(hl7_edge::fhir::json::to_vec(black_box(&tree))))
    });
    // A floor. Whatever its rules, a mapper that builds this Bundle as a tree allocates and
    // fills every node of the resources, and frees them once the Bundle is written: a copy of
    // the finished trees, dropped, costs that much and nothing else.
    g.bench_function("floor_resources_copy", |b| {
        b.iter(|| {
            black_box(&mapped.resources)
                .iter()
                .map(|r| r.json.clone())
                .collect::<Vec<_>>()
        })
    });
    // The envelope alone (MessageHeader, Provenance, entries): the resources it takes are
    // copied before the clock starts, and the Bundle is dropped after it stops.
    g.bench_function("stage_envelope", |b| {
        b.iter_batched(
            || hl7_edge::map::MapResult {
                resources: mapped.resources.clone(),
                focus: mapped.focus.clone(),
                sender: mapped.sender,
                ..Default::default()
            },
            |m| envelope::assemble(&input, m),
            criterion::BatchSize::SmallInput,
        )
    });
    let processor =
        Processor::new(Arc::new(set), site.clone(), Default::default()).expect("processor");
    g.bench_function("parse_map_validate_json", |b| {
        b.iter(|| {
            let p = processor
                .bundle(black_box(MESSAGE), feed, received)
                .expect("bundle");
            black_box(hl7_edge::fhir::json::to_vec(&p.bundle))
        })
    });
    g.finish();
}

/// The envelope's inputs for `msg` (the hash of the raw bytes is not part of the measure).
fn envelope_input<'a>(
    site: &'a SiteConfig,
    tz: &'a jiff::tz::TimeZone,
    msg: &'a hl7::Message,
    received: jiff::Timestamp,
) -> EnvelopeInput<'a> {
    EnvelopeInput {
        site,
        tz,
        header: msg.header(),
        received_at: received,
        raw_sha256: [0; 32],
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
