//! Generates the Rust types and tonic services from `proto/`.
//!
//! Uses the vendored `protoc` so builds do not depend on a system install;
//! an explicit `PROTOC` environment variable still wins.

use std::path::PathBuf;

const PROTO_DIR: &str = "proto";

const PROTOS: &[&str] = &[
    "proto/etcd/kv.proto",
    "proto/etcd/auth.proto",
    "proto/etcd/rpc.proto",
    "proto/raftpb.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_DIR}");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    println!("cargo:rerun-if-env-changed=PROTOC");

    let protoc: PathBuf = match std::env::var_os("PROTOC") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => protoc_bin_vendored::protoc_bin_path()?,
    };

    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    // A stored key-value's value is shared, not copied, between the value cache, a Range's
    // response and watch events.
    config.bytes([".mvccpb.KeyValue.value"]);

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_with_config(config, PROTOS, &[PROTO_DIR])?;

    // The server side of etcd's Watch service once more, under the same route
    // (`/etcdserverpb.Watch/Watch`), but answering with `EncodedWatchResponse`: the same wire
    // bytes as `WatchResponse`, with each event encoded once for all of its watchers.
    let watch = tonic_prost_build::manual::Service::builder()
        .name("Watch")
        .package("etcdserverpb")
        .method(
            tonic_prost_build::manual::Method::builder()
                .name("watch")
                .route_name("Watch")
                .input_type("crate::etcdserverpb::WatchRequest")
                .output_type("crate::wire::EncodedWatchResponse")
                .codec_path("crate::wire::WatchCodec")
                .client_streaming()
                .server_streaming()
                .build(),
        )
        .build();
    // The server side of etcd's KV service once more, under the same routes, with Range
    // answering `EncodedRangeResponse`: the same wire bytes as `RangeResponse`, with each
    // key-value copied in as it is stored instead of cloned and encoded field by field.
    let method = |name: &str, route: &str, input: &str, output: &str, codec: &str| {
        tonic_prost_build::manual::Method::builder()
            .name(name)
            .route_name(route)
            .input_type(format!("crate::etcdserverpb::{input}"))
            .output_type(output)
            .codec_path(codec)
            .build()
    };
    let prost = "tonic_prost::ProstCodec";
    let kv = tonic_prost_build::manual::Service::builder()
        .name("KV")
        .package("etcdserverpb")
        // List pages are large: Range's codec reserves a response's whole length first.
        .method(method(
            "range",
            "Range",
            "RangeRequest",
            "crate::wire::EncodedRangeResponse",
            "crate::wire::SizedCodec",
        ))
        .method(method(
            "put",
            "Put",
            "PutRequest",
            "crate::etcdserverpb::PutResponse",
            prost,
        ))
        .method(method(
            "delete_range",
            "DeleteRange",
            "DeleteRangeRequest",
            "crate::etcdserverpb::DeleteRangeResponse",
            prost,
        ))
        .method(method(
            "txn",
            "Txn",
            "TxnRequest",
            "crate::etcdserverpb::TxnResponse",
            prost,
        ))
        .method(method(
            "compact",
            "Compact",
            "CompactionRequest",
            "crate::etcdserverpb::CompactionResponse",
            prost,
        ))
        .build();
    tonic_prost_build::manual::Builder::new()
        .build_client(false)
        .compile(&[watch, kv]);

    Ok(())
}
