//! Prints the MIL text of a program: `cargo run -p ggml-coreml-program --example mil_text -- w8f16-g32o-m512-k4096-n4096`
//! style arguments as `<variant> <m> <k> <n> [group] [o]`.

use ggml_coreml_program::emit::mil_text;
use ggml_coreml_program::{ProgramDesc, Variant, build_program};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, d: usize| a.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let variant = a
        .first()
        .and_then(|s| Variant::parse(s))
        .unwrap_or(Variant::I8I8);
    let desc = ProgramDesc {
        variant,
        m: num(1, 512),
        k: num(2, 4096),
        n: num(3, 4096),
        group: num(4, 0),
        offsets: a.get(5).is_some_and(|s| s == "o"),
    };
    print!("{}", mil_text(&build_program(&desc)?));
    Ok(())
}
