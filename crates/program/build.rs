//! Generates the CoreML protobuf types from our schema subset in `proto/` (no protoc needed).

fn main() {
    let files = [
        "proto/Model.proto",
        "proto/MIL.proto",
        "proto/FeatureTypes.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(["Model.proto"], ["proto"]).expect("CoreML schema subset compiles");
    prost_build::Config::new()
        // BTreeMap keeps map fields (op inputs, attributes) in key order: same program, same bytes.
        .btree_map(["."])
        .compile_fds(fds)
        .expect("prost-build generates the CoreML types");
}
