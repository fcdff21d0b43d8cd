//! The shared executor cases (`tests/common`) on the reference executor, on every platform — the same
//! cases `tests/device.rs` runs against the CoreML executor on a device.

mod common;

use ggml_coreml_executor::platform;
use ggml_coreml_executor::reference::ReferenceExecutor;

#[test]
fn shared_cases_on_the_reference_executor() {
    let exec = ReferenceExecutor::new();
    let results = common::run_all(&exec);
    assert_eq!(results.len(), common::small_shapes().len());
}

#[test]
fn best_executor_is_usable() {
    let (exec, why) = platform::best_executor();
    eprintln!("best executor: {} ({why})", exec.name());
    assert!(!why.is_empty());
    // Only the reference executor runs here; the CoreML one runs in the device suite (--features device).
    if exec.name() == "reference" {
        let d = common::desc(ggml_coreml_executor::Variant::I8I8, 64, 64, 16, 0, false);
        common::check_shape(exec.as_ref(), &d, 1, None);
    }
}
