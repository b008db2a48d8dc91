//! `tessera-sim`: runs simulated schedules of faults against the volume
//! client and the zone, and reports any broken promise with its seed.

use std::time::Instant;

use clap::Parser;
use tessera_sim::{run, Config};

/// Runs deterministic fault schedules; every failure prints the seed that replays it.
#[derive(Parser, Debug)]
#[command(name = "tessera-sim")]
struct Args {
    /// Replay this one schedule (with logs: RUST_LOG=debug).
    #[arg(long)]
    seed: Option<u64>,
    /// Schedules to run.
    #[arg(long, default_value_t = 1000)]
    schedules: u64,
    /// First seed of the run (seeds are consecutive).
    #[arg(long, default_value_t = 1)]
    first_seed: u64,
    /// Threads running schedules in parallel.
    #[arg(long, default_value_t = 2)]
    threads: u64,
    /// Copies of every chunk.
    #[arg(long, default_value_t = 2)]
    mirrors: u32,
    /// Storage nodes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Placement groups.
    #[arg(long, default_value_t = 1)]
    stripes: u32,
    /// vDisk size in chunks.
    #[arg(long, default_value_t = 32)]
    chunks: u64,
    /// Bytes per chunk.
    #[arg(long, default_value_t = 64 << 10)]
    chunk_size: u64,
    /// Simulated seconds of faults per schedule.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
}

fn main() {
    let args = Args::parse();
    let cfg = Config {
        nodes: args.nodes,
        mirrors: args.mirrors,
        stripes: args.stripes,
        chunks: args.chunks,
        chunk_size: args.chunk_size,
        seconds: args.seconds,
        ..Config::default()
    };
    if let Some(seed) = args.seed {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
        let o = run(seed, &cfg);
        println!(
            "seed {seed}: {} ops, {} guest errors, faults {:?}",
            o.ops, o.guest_errors, o.faults
        );
        for v in &o.violations {
            println!("  VIOLATION: {v}");
        }
        std::process::exit(if o.violations.is_empty() { 0 } else { 1 });
    }
    let started = Instant::now();
    let next = std::sync::atomic::AtomicU64::new(args.first_seed);
    let last = args.first_seed + args.schedules;
    let totals = std::sync::Mutex::new((
        0u64,
        0u64,
        0u64,
        std::collections::BTreeMap::new(),
        Vec::new(),
    ));
    std::thread::scope(|s| {
        for _ in 0..args.threads.max(1) {
            s.spawn(|| loop {
                let seed = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if seed >= last {
                    return;
                }
                let o = run(seed, &cfg);
                let mut t = totals.lock().expect("poisoned");
                t.0 += 1;
                t.1 += o.ops;
                t.2 += o.guest_errors;
                for (k, v) in &o.faults {
                    *t.3.entry(*k).or_insert(0u64) += v;
                }
                for v in &o.violations {
                    eprintln!("seed {seed}: VIOLATION: {v}");
                    eprintln!("  replay: cargo run --release -p tessera-sim -- --seed {seed} --mirrors {} --nodes {} --stripes {} --chunks {} --chunk-size {} --seconds {}", cfg.mirrors, cfg.nodes, cfg.stripes, cfg.chunks, cfg.chunk_size, cfg.seconds);
                    t.4.push(seed);
                }
                if t.0 % 1000 == 0 {
                    // The failing seeds so far on every progress line: a
                    // long run read from its last lines tells the truth.
                    let mut failing = t.4.clone();
                    failing.sort_unstable();
                    failing.dedup();
                    eprintln!(
                        "{} schedules, {:.0} s, {} failing seed(s){}",
                        t.0,
                        started.elapsed().as_secs_f64(),
                        failing.len(),
                        if failing.is_empty() {
                            String::new()
                        } else {
                            format!(": {failing:?}")
                        }
                    );
                }
            });
        }
    });
    let t = totals.into_inner().expect("poisoned");
    println!(
        "{} schedules (seeds {}..{}) in {:.1} s: {} requests, {} guest errors, {} violations",
        t.0,
        args.first_seed,
        last,
        started.elapsed().as_secs_f64(),
        t.1,
        t.2,
        t.4.len()
    );
    println!("faults injected:");
    for (k, v) in &t.3 {
        println!("  {v:>8}  {k}");
    }
    let mut seeds = t.4.clone();
    seeds.dedup();
    if !seeds.is_empty() {
        println!("failing seeds: {seeds:?}");
        std::process::exit(1);
    }
}
