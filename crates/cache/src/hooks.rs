//! Pause points inside writes, for the kill -9 tests. Compiled in only with the `test-hooks` feature;
//! then `GGML_COREML_CACHE_TEST_PAUSE=<point>:<ms>` makes the writer announce the point on stderr and sleep.

#[cfg(feature = "test-hooks")]
pub(crate) fn pause(point: &str) {
    use std::io::Write;
    let Ok(v) = std::env::var("GGML_COREML_CACHE_TEST_PAUSE") else {
        return;
    };
    let Some((p, ms)) = v.split_once(':') else {
        return;
    };
    if p != point {
        return;
    }
    let ms: u64 = ms.parse().unwrap_or(0);
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "GGML_COREML_CACHE_TEST_PAUSED {point}");
    let _ = err.flush();
    drop(err);
    std::thread::sleep(std::time::Duration::from_millis(ms));
}

#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub(crate) fn pause(_point: &str) {}
