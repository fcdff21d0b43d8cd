//! On-device suite of the CoreML executor. On a Mac with macOS 26+ (see docs/apple.md):
//!
//! ```text
//! cargo test -p ggml-coreml-executor --features device --release --test device -- --nocapture --test-threads=1
//! ```
//!
//! What it verifies: every variant compiles, is placed on the Neural Engine (MLComputePlan) and passes
//! the self-check; the shared executor cases (`tests/common`, the same ones the reference executor
//! passes on Linux) meet NMSE ≤ 5e-4 against the ideal product; CoreML agrees with the reference
//! executor; a second process finds every program in the disk cache (no compile); bad inputs are
//! errors. It prints per shape: compile/load time, run time, TOPS, placement, self-check, and whether
//! CoreML honoured the output backings.
//!
//! Elsewhere (Linux, or without `--features device`) the suite is one test that says it was skipped.

#[cfg(not(all(target_vendor = "apple", feature = "device")))]
#[test]
fn device_suite() {
    eprintln!(
        "skipped: the device suite needs an Apple device and `--features device` (docs/apple.md)"
    );
}

#[cfg(all(target_vendor = "apple", feature = "device"))]
mod common;

#[cfg(all(target_vendor = "apple", feature = "device"))]
mod device {
    use std::path::PathBuf;
    use std::process::Command;
    use std::sync::OnceLock;
    use std::time::{Instant, SystemTime, UNIX_EPOCH};

    use ggml_coreml_executor::coreml::check::{DEVICE_MAX_NMSE, OwnedInputs};
    use ggml_coreml_executor::coreml::{self, CoreMlExecutor, Settings};
    use ggml_coreml_executor::reference::ReferenceExecutor;
    use ggml_coreml_executor::{Executor, Variant, platform};
    use half::f16;

    use super::common;

    /// Set in the child processes of the cache test.
    const CHILD_ENV: &str = "GGML_COREML_DEVICE_CHILD";

    fn temp_dir(tag: &str) -> PathBuf {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        std::env::temp_dir().join(format!(
            "ggml-coreml-device-{tag}-{}-{nanos}",
            std::process::id()
        ))
    }

    /// One executor for the suite, on a fresh cache directory, so first prepares really compile.
    fn exec() -> &'static CoreMlExecutor {
        static EXEC: OnceLock<CoreMlExecutor> = OnceLock::new();
        EXEC.get_or_init(|| {
            // The speed check would refuse the suite's small shapes (the CPU wins those); it has a
            // test of its own below.
            let settings = Settings {
                cache_dir: Some(temp_dir("suite")),
                speed_check: false,
                ..Settings::from_env()
            };
            let e = coreml::try_new_with(settings).expect("CoreML executor");
            let caps = e.capabilities();
            assert!(
                caps.accelerated,
                "this device cannot run the programs: {}",
                caps.description
            );
            e
        })
    }

    fn print_status(e: &CoreMlExecutor, d: &ggml_coreml_executor::ProgramDesc) {
        if let Some(s) = e.status(d) {
            eprintln!(
                "  {:<26} {} compile/find {:>8.1} ms, load {:>8.1} ms, placement [{}], self-check [{}], speed [{}]{}",
                d.key(),
                if s.cache_hit { "cached  " } else { "compiled" },
                s.compile_ms,
                s.load_ms,
                s.placement,
                s.self_check.as_deref().unwrap_or("off"),
                s.speed_check.as_deref().unwrap_or("off"),
                s.refused
                    .as_ref()
                    .map(|r| format!(", REFUSED: {r}"))
                    .unwrap_or_default()
            );
        }
    }

    #[test]
    fn facts_and_capabilities() {
        eprintln!("platform: {}", platform::describe());
        let e = exec();
        eprintln!("facts: {:?}", e.facts());
        let caps = e.capabilities();
        eprintln!("capabilities: {caps:?}");
        assert_eq!(caps.variants, Variant::ALL.to_vec());
        assert!(e.facts().neural_engine.present());
    }

    /// The startup probe (int8 and fp16 surfaces → arrays → a prediction) and the speed check (ANE vs
    /// the same model loaded CPU-only) on model-sized programs; prints every verdict.
    #[test]
    fn startup_probe_and_speed_verdicts() {
        let settings = Settings {
            cache_dir: Some(temp_dir("speed")),
            speed_check: true,
            ..Settings::from_env()
        };
        let e = coreml::try_new_with(settings).expect("CoreML executor");
        let t = Instant::now();
        let probe = e.probe();
        eprintln!(
            "startup probe: {probe:?} in {:.0} ms; int8 refused: {:?}",
            t.elapsed().as_secs_f64() * 1e3,
            e.int8_refused()
        );
        assert!(probe.is_ok(), "startup probe failed: {probe:?}");
        eprintln!("speed verdicts (ane vs cpu-only, same compiled model):");
        for d in common::large_shapes().into_iter().take(6) {
            let r = e.prepare(&d);
            print_status(&e, &d);
            if let Err(err) = r {
                eprintln!("    refused: {err}");
            }
        }
        let st = e.stats();
        eprintln!("stats: {st:?}");
    }

    #[test]
    fn shared_cases_placement_and_agreement_with_the_reference() {
        let e = exec();
        common::run_all(e);
        let reference = ReferenceExecutor::new();
        eprintln!("per program (tolerance vs reference: nmse ≤ {DEVICE_MAX_NMSE:e}):");
        for d in common::small_shapes() {
            let s = e.status(&d).expect("prepared by run_all");
            assert!(s.refused.is_none(), "{d}: refused: {:?}", s.refused);
            assert!(
                s.placement == "ane" || s.placement.contains("matmul:ane"),
                "{d}: placement {}",
                s.placement
            );
            let a = common::compare_executors(e, &reference, &d);
            print_status(e, &d);
            eprintln!("    coreml vs reference: {a}");
            assert!(a.within(DEVICE_MAX_NMSE), "{d}: coreml vs reference {a}");
        }
        let st = e.stats();
        eprintln!(
            "stats: {st:?}; outputBackings honoured in {} of {} predictions",
            st.predictions - st.backing_ignored,
            st.predictions
        );
    }

    #[test]
    fn large_shapes_timing() {
        let e = exec();
        eprintln!("model-sized programs (10 runs each, 2048 sampled entries vs the f64 product):");
        for d in common::large_shapes() {
            let r = common::check_shape(e, &d, 10, Some(2048));
            r.print();
            print_status(e, &d);
        }
    }

    #[test]
    fn dispatch_overhead() {
        let e = exec();
        let d = common::desc(Variant::I8I8, 64, 64, 64, 0, false);
        e.prepare(&d).unwrap();
        let inputs = OwnedInputs::random(&d, 3);
        let mut out = vec![f16::ZERO; d.n * d.m];
        let mut times: Vec<f64> = (0..200)
            .map(|_| {
                let t = Instant::now();
                e.run(&d, inputs.inputs(), 0, &mut out).unwrap();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        eprintln!(
            "dispatch of the smallest program ({d}): median {:.3} ms, p10 {:.3} ms, p90 {:.3} ms",
            times[100], times[20], times[180]
        );
    }

    #[test]
    fn bad_inputs_are_errors() {
        common::check_bad_inputs(exec());
    }

    /// Spawns this test binary twice on one fresh cache directory: the first run compiles every
    /// program, the second finds them all in the cache.
    #[test]
    fn cache_reuse_across_processes() {
        if std::env::var_os(CHILD_ENV).is_some() {
            return;
        }
        let dir = temp_dir("cache");
        let run = |n: usize| {
            let t = Instant::now();
            let out = Command::new(std::env::current_exe().unwrap())
                .args([
                    "device::child_prepares",
                    "--exact",
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_ENV, "1")
                .env("GGML_COREML_CACHE_DIR", &dir)
                .output()
                .expect("spawn the test binary");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "child {n} failed:\n{text}");
            let line = text
                .lines()
                .find(|l| l.starts_with("CHILD-STATS"))
                .unwrap_or_else(|| panic!("no stats:\n{text}"));
            eprintln!("child {n} ({:.1} s): {line}", t.elapsed().as_secs_f64());
            let field = |name: &str| -> u64 {
                line.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("{name} missing in {line}"))
            };
            (field("compiled"), field("cache_hits"), field("refused"))
        };
        let programs = common::small_shapes().len() as u64;
        let first = run(1);
        assert_eq!(
            first,
            (programs, 0, 0),
            "first process: (compiled, cache hits, refused)"
        );
        let second = run(2);
        assert_eq!(
            second,
            (0, programs, 0),
            "second process: (compiled, cache hits, refused)"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The child of `cache_reuse_across_processes` (ignored unless spawned by it).
    #[test]
    #[ignore = "spawned by cache_reuse_across_processes"]
    fn child_prepares() {
        if std::env::var_os(CHILD_ENV).is_none() {
            return;
        }
        let e = coreml::try_new().expect("CoreML executor");
        for d in common::small_shapes() {
            if let Err(err) = e.prepare(&d) {
                eprintln!("{d}: {err}");
            }
            print_status(&e, &d);
        }
        let s = e.stats();
        println!(
            "CHILD-STATS compiled={} cache_hits={} refused={}",
            s.compiled, s.cache_hits, s.refused
        );
    }
}
