//! Property: no input message makes the mapping engine panic or hang. Messages are generated from
//! the real fixtures and golden inputs by deterministic random mutation (truncation, dropped,
//! repeated and reordered segments, stray delimiters, escapes, HL7 nulls, huge repetitions,
//! random bytes), and each goes through the whole offline path: charset, parse, route, map (with
//! and without `--explain` tracing), envelope, validation. Any outcome but a panic is fine.
//!
//! The generator is a fixed-seed xorshift, so a failure reproduces exactly; set
//! `HL7EDGE_FUZZ_ROUNDS` for a longer run.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hl7_edge::config::SiteConfig;
use hl7_edge::ingest::adapter::{self, FeedConfig};
use hl7_edge::map::{Explain, MappingSet, Sources};
use hl7_edge::pipeline::Processor;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<PathBuf> = Vec::new();
    for dir in [
        "tests/fixtures",
        "mappings/tests/adt",
        "mappings/tests/datatypes",
        "mappings/tests/oru",
    ] {
        if let Ok(rd) = std::fs::read_dir(root.join(dir)) {
            files.extend(
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "hl7")),
            );
        }
    }
    files.sort();
    let seeds: Vec<Vec<u8>> = files.iter().filter_map(|f| std::fs::read(f).ok()).collect();
    assert!(
        seeds.len() >= 5,
        "the fixtures are the seeds: found {}",
        seeds.len()
    );
    seeds
}

const PIECES: &[&[u8]] = &[
    b"|",
    b"^",
    b"~",
    b"\\",
    b"&",
    b"\r",
    b"\n",
    b"\"\"",
    b"\\X41\\",
    b"\\F\\",
    b"\\.br\\",
    b"\\X",
    b"\xff\xfe",
    b"\xc3",
    b"00000000000000000000",
    b"-",
    b"<",
    b"9449305552",
    b"ORU^R01",
    b"ADT^A03^ADT_A02",
    b"ZDT^Z01",
    b"20261025013000",
    b"202603290130",
    b"NM",
    b"SN",
    b"CWE",
    b"OBX|1|SN|X||^1^:^0",
    b"OBR|9",
    b"SPM|1",
    b"NTE|1||x",
    b"ORC|RE",
    b"PV1|1|I|",
];

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut segs: Vec<Vec<u8>> = seed
        .split(|b| *b == b'\r')
        .filter(|s| !s.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    for _ in 0..=rng.below(4) {
        match rng.below(9) {
            0 if segs.len() > 1 => {
                let i = 1 + rng.below(segs.len() - 1);
                segs.remove(i);
            }
            1 if !segs.is_empty() => {
                let i = rng.below(segs.len());
                let s = segs[i].clone();
                for _ in 0..=rng.below(30) {
                    segs.insert(i, s.clone());
                }
            }
            2 if segs.len() > 2 => {
                let a = 1 + rng.below(segs.len() - 1);
                let b = 1 + rng.below(segs.len() - 1);
                segs.swap(a, b);
            }
            3 => {
                let i = rng.below(segs.len().max(1));
                if let Some(s) = segs.get_mut(i) {
                    let at = rng.below(s.len() + 1);
                    let piece = PIECES[rng.below(PIECES.len())];
                    s.splice(at..at, piece.iter().copied());
                }
            }
            4 => {
                let i = rng.below(segs.len().max(1));
                if let Some(s) = segs.get_mut(i) {
                    let at = rng.below(s.len() + 1);
                    s.truncate(at);
                }
            }
            5 => {
                let i = rng.below(segs.len().max(1));
                if let Some(s) = segs.get_mut(i) {
                    let rep: Vec<u8> = b"~A^B&C".repeat(1 + rng.below(2000));
                    let at = rng.below(s.len() + 1);
                    s.splice(at..at, rep);
                }
            }
            6 => {
                let i = rng.below(segs.len().max(1));
                if let Some(s) = segs.get_mut(i)
                    && !s.is_empty()
                {
                    let at = rng.below(s.len());
                    s[at] = rng.next() as u8;
                }
            }
            7 => {
                let piece = PIECES[rng.below(PIECES.len())];
                let at = rng.below(segs.len() + 1);
                segs.insert(at, piece.to_vec());
            }
            _ => {
                // Re-route the message to another mapping.
                if let Some(msh) = segs.first_mut() {
                    let text = String::from_utf8_lossy(msh).into_owned();
                    let to =
                        ["ORU^R01^ORU_R01", "ADT^A01^ADT_A01", "ZDT^Z01", "ADT^A08"][rng.below(4)];
                    let mut fields: Vec<String> = text.split('|').map(str::to_string).collect();
                    if fields.len() > 8 {
                        fields[8] = to.to_string();
                    }
                    *msh = fields.join("|").into_bytes();
                }
            }
        }
    }
    let mut out = segs.join(&b'\r');
    if rng.below(3) == 0 {
        let at = rng.below(out.len() + 1);
        out.truncate(at);
    }
    out
}

/// The offline path over the shipped mappings and the golden tests' own, and the embedded feed.
fn processor() -> (Processor, FeedConfig) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tests = root.join("mappings/tests");
    let set = MappingSet::load_sources(
        &Sources {
            base: Some(&root.join("mappings")),
            site: None,
            extra: vec![&tests],
        },
        None,
    )
    .unwrap_or_else(|e| panic!("mappings load: {e:?}"));
    let processor = Processor::new(Arc::new(set), SiteConfig::default(), Default::default())
        .expect("processor");
    let mut feeds = adapter::load(None, &SiteConfig::default()).expect("embedded feed");
    (processor, feeds.remove(0))
}

#[test]
fn no_message_makes_the_mapping_engine_panic() {
    let (processor, feed) = processor();
    let feed = &feed;
    let rounds: usize = std::env::var("HL7EDGE_FUZZ_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let seeds = seeds();
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let received = jiff::Timestamp::from_second(1_780_000_000).expect("time");
    let mut mapped = 0;
    for round in 0..rounds {
        let seed = &seeds[round % seeds.len()];
        let msg = mutate(&mut rng, seed);
        let explain = if round % 4 == 0 {
            Explain::On
        } else {
            Explain::Off
        };
        let res = catch_unwind(AssertUnwindSafe(|| {
            processor
                .build(&msg, feed, received, explain)
                .and_then(|p| processor.validate(&p.bundle).map(|()| p))
        }));
        match res {
            Ok(Ok(_)) => mapped += 1,
            Ok(Err(_)) => {}
            Err(_) => panic!(
                "round {round}: the engine panicked on this input ({} bytes):\n{:?}",
                msg.len(),
                String::from_utf8_lossy(&msg)
            ),
        }
    }
    // The mutations must not be so destructive that mapping is never exercised.
    assert!(
        mapped * 10 >= rounds,
        "only {mapped} of {rounds} mutated messages were mapped"
    );
}

/// Every `.hl7` file below `dir` (none if it does not exist).
fn hl7_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for p in rd.filter_map(|e| e.ok().map(|e| e.path())) {
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "hl7" || x == "txt") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn explain_tracing_changes_nothing_but_the_explanation() {
    // Without `--explain` the engine takes shortcuts (an element whose source components are
    // all empty is not built at all); with it, every rule runs. Both must give the same Bundle,
    // the same notes and the same refusals, for real messages and for mutated ones.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (processor, feed) = processor();
    let feed = &feed;
    let received = jiff::Timestamp::from_second(1_780_000_000).expect("time");

    let mut inputs: Vec<Vec<u8>> = seeds();
    inputs.extend(std::fs::read(root.join("benches/adt_a01_large.hl7")));
    // The third-party corpus beside the clone, where present (it is in CI).
    for f in hl7_files(&root.join("../shared/corpus")) {
        inputs.extend(std::fs::read(f));
    }
    let mut rng = Rng(0x0e7a_1a1e_5eed_0002);
    let real = inputs.len();
    for i in 0..300 {
        let m = mutate(&mut rng, &inputs[i % real]);
        inputs.push(m);
    }
    let mut bundles = 0;
    for (i, msg) in inputs.iter().enumerate() {
        let plain = processor.build(msg, feed, received, Explain::Off);
        let traced = processor.build(msg, feed, received, Explain::On);
        match (plain, traced) {
            (Ok(a), Ok(b)) => {
                assert!(a.bundle == b.bundle, "input {i}: the Bundles differ");
                assert_eq!(a.warnings, b.warnings, "input {i}: the notes differ");
                bundles += 1;
            }
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "input {i}"),
            (a, b) => panic!(
                "input {i}: without --explain {:?}, with it {:?}",
                a.map(|_| "a Bundle"),
                b.map(|_| "a Bundle")
            ),
        }
    }
    assert!(bundles >= 40, "only {bundles} inputs were mapped");
}
