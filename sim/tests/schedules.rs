//! The simulation in CI: thousands of seeded fault schedules against the
//! real volume client and zone service, none of which may break a promise.
//! `TESSERA_SIM_SCHEDULES` sets how many (10,000 by default) and
//! `TESSERA_SIM_FIRST_SEED` where they start; a failure prints the
//! command that replays its seed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tessera_sim::{run, Config};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn run_many(cfg: &Config, first: u64, count: u64) -> Vec<String> {
    let next = AtomicU64::new(first);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= first + count {
                    return;
                }
                let o = run(seed, cfg);
                for v in o.violations {
                    failures.lock().expect("poisoned").push(format!(
                        "seed {seed}: {v}\n  replay: cargo run --release -p tessera-sim -- --seed {seed} --mirrors {} --nodes {} --stripes {} --chunks {} --chunk-size {} --seconds {}",
                        cfg.mirrors, cfg.nodes, cfg.stripes, cfg.chunks, cfg.chunk_size, cfg.seconds
                    ));
                }
            });
        }
    });
    failures.into_inner().expect("poisoned")
}

#[test]
fn seeded_fault_schedules_break_no_promise() {
    let count = env("TESSERA_SIM_SCHEDULES", 10_000);
    let first = env("TESSERA_SIM_FIRST_SEED", 1);
    // Mostly the common shape; a share with three copies and with stripes.
    // Two nodes more than copies: room for moves (rebuild, drain,
    // rebalance) while a node is out.
    let shapes = [
        (
            Config {
                nodes: 4,
                ..Config::default()
            },
            count * 6 / 10,
        ),
        (
            Config {
                nodes: 5,
                mirrors: 3,
                ..Config::default()
            },
            count * 2 / 10,
        ),
        (
            Config {
                nodes: 5,
                stripes: 3,
                ..Config::default()
            },
            count - count * 6 / 10 - count * 2 / 10,
        ),
    ];
    let mut failures = Vec::new();
    let mut start = first;
    for (cfg, n) in &shapes {
        failures.extend(run_many(cfg, start, *n));
        start += n;
    }
    assert!(
        failures.is_empty(),
        "{} violations:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn a_seed_replays_the_same_schedule() {
    let cfg = Config::default();
    for seed in [3, 77] {
        let a = run(seed, &cfg);
        let b = run(seed, &cfg);
        assert_eq!(
            (a.ops, a.guest_errors, &a.faults, &a.violations),
            (b.ops, b.guest_errors, &b.faults, &b.violations),
            "seed {seed} ran differently twice"
        );
    }
}

/// A schedule that does not finish within its bound of simulated time is
/// a violation with its seed (a request, a repair or a close that hangs),
/// not a run that never ends: here the bound is shorter than the workload
/// itself.
///
/// Fails if `run` waits for the schedule without a bound.
#[test]
fn a_schedule_past_its_bound_is_a_violation() {
    let cfg = Config {
        nodes: 4,
        seconds: 5,
        finish_within: std::time::Duration::ZERO,
        ..Config::default()
    };
    let o = run(7, &cfg);
    assert_eq!(o.seed, 7);
    assert!(
        o.violations
            .iter()
            .any(|v| v.contains("did not finish within 5 simulated seconds")),
        "{:?}",
        o.violations
    );
    // The default bound is far above what a schedule takes.
    let o = run(
        7,
        &Config {
            nodes: 4,
            seconds: 5,
            ..Config::default()
        },
    );
    assert!(o.violations.is_empty(), "{:?}", o.violations);
}
