//! Normalized, comparable observations of etcd responses.
//!
//! Every response is turned into a `serde_json::Value` that keeps everything a client can
//! observe about the KV semantics, and drops what legitimately differs between two servers:
//! `header.cluster_id`, `header.member_id` and `header.raft_term` are removed,
//! `header.revision` is kept (every server starts at revision 1, so revisions must agree).
//! Errors keep the gRPC code and message.

use etcd_client::{
    CompactionResponse, DeleteResponse, Error, GetResponse, KeyValue, LeaseGrantResponse,
    LeaseRevokeResponse, LeaseTimeToLiveResponse, PutResponse, ResponseHeader, TxnOpResponse,
    TxnResponse,
};
use serde_json::{json, Map, Value};

/// One recorded step of a scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// Human-readable name of the step, e.g. `"put foo=bar prev_kv"`.
    pub step: String,
    /// Normalized outcome: `{"ok": ...}` or `{"error": {...}}`, or anything a scenario records.
    pub value: Value,
}

/// Byte strings longer than this are summarized (length + hash) instead of spelled out.
const MAX_INLINE_BYTES: usize = 256;

/// Keys and values: UTF-8 text as a JSON string, anything else as `{"hex": ..}`; large blobs as
/// `{"len": n, "fnv1a64": ..}` so diffs stay readable.
pub fn bytes(b: &[u8]) -> Value {
    if b.len() > MAX_INLINE_BYTES {
        return json!({ "len": b.len(), "fnv1a64": format!("{:016x}", fnv1a64(b)) });
    }
    match std::str::from_utf8(b) {
        Ok(s) => Value::String(s.to_owned()),
        Err(_) => json!({ "hex": b.iter().map(|x| format!("{x:02x}")).collect::<String>() }),
    }
}

fn fnv1a64(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `{"revision": r}`, or `null` when the header is absent.
pub fn header(h: Option<&ResponseHeader>) -> Value {
    match h {
        Some(h) => json!({ "revision": h.revision() }),
        None => Value::Null,
    }
}

/// The revision in a header (0 if absent).
pub fn revision(h: Option<&ResponseHeader>) -> i64 {
    h.map(ResponseHeader::revision).unwrap_or(0)
}

pub fn kv(kv: &KeyValue) -> Value {
    json!({
        "key": bytes(kv.key()),
        "value": bytes(kv.value()),
        "create_revision": kv.create_revision(),
        "mod_revision": kv.mod_revision(),
        "version": kv.version(),
        "lease": kv.lease(),
    })
}

pub fn kvs(kvs: &[KeyValue]) -> Value {
    Value::Array(kvs.iter().map(kv).collect())
}

pub fn put_response(r: &PutResponse) -> Value {
    json!({
        "header": header(r.header()),
        "prev_kv": r.prev_key().map(kv).unwrap_or(Value::Null),
    })
}

pub fn get_response(r: &GetResponse) -> Value {
    json!({
        "header": header(r.header()),
        "kvs": kvs(r.kvs()),
        "more": r.more(),
        "count": r.count(),
    })
}

pub fn delete_response(r: &DeleteResponse) -> Value {
    json!({
        "header": header(r.header()),
        "deleted": r.deleted(),
        "prev_kvs": kvs(r.prev_kvs()),
    })
}

pub fn txn_response(r: &TxnResponse) -> Value {
    let responses: Vec<Value> = r
        .op_responses()
        .iter()
        .map(|op| match op {
            TxnOpResponse::Put(p) => json!({ "put": put_response(p) }),
            TxnOpResponse::Get(g) => json!({ "range": get_response(g) }),
            TxnOpResponse::Delete(d) => json!({ "delete_range": delete_response(d) }),
            TxnOpResponse::Txn(t) => json!({ "txn": txn_response(t) }),
        })
        .collect();
    json!({
        "header": header(r.header()),
        "succeeded": r.succeeded(),
        "responses": responses,
    })
}

pub fn compaction_response(r: &CompactionResponse) -> Value {
    json!({ "header": header(r.header()) })
}

/// Lease IDs are kept: scenarios must grant leases with explicit IDs (`LeaseGrantOptions::with_id`)
/// so that both servers use the same ones.
pub fn lease_grant_response(r: &LeaseGrantResponse) -> Value {
    json!({
        "header": header(r.header()),
        "id": r.id(),
        "ttl": r.ttl(),
        "error": r.error(),
    })
}

pub fn lease_revoke_response(r: &LeaseRevokeResponse) -> Value {
    json!({ "header": header(r.header()) })
}

/// TTLs count down in real time, so only `granted_ttl`, the keys and "expired" (ttl == -1) are
/// kept. The keys are sorted: etcd returns them in Go map iteration order (random per call).
pub fn lease_time_to_live_response(r: &LeaseTimeToLiveResponse) -> Value {
    let mut keys = r.keys().to_vec();
    keys.sort();
    json!({
        "header": header(r.header()),
        "id": r.id(),
        "granted_ttl": r.granted_ttl(),
        "expired": r.ttl() == -1,
        "keys": keys.iter().map(|k| bytes(k)).collect::<Vec<_>>(),
    })
}

/// gRPC errors as `{"code": "InvalidArgument", "message": "etcdserver: ..."}`; any other client
/// error as `{"client_error": "<display>"}`.
pub fn error(e: &Error) -> Value {
    match e {
        Error::GRpcStatus(status) => json!({
            "code": format!("{:?}", status.code()),
            "message": status.message(),
        }),
        other => json!({ "client_error": other.to_string() }),
    }
}

/// `{"ok": f(value)}` or `{"error": error(e)}`.
pub fn result<T>(r: &Result<T, Error>, f: impl FnOnce(&T) -> Value) -> Value {
    match r {
        Ok(v) => json!({ "ok": f(v) }),
        Err(e) => json!({ "error": error(e) }),
    }
}

/// The `(code, message)` of a gRPC error result, e.g. `("OutOfRange", "etcdserver: mvcc: ...")`.
pub fn grpc_error<T>(r: &Result<T, Error>) -> Option<(String, String)> {
    match r {
        Err(Error::GRpcStatus(s)) => Some((format!("{:?}", s.code()), s.message().to_owned())),
        _ => None,
    }
}

/// Fails unless `r` is the gRPC error `code` (tonic `Code` Debug name) with exactly `message`.
pub fn expect_grpc_error<T: std::fmt::Debug>(
    r: &Result<T, Error>,
    code: &str,
    message: &str,
) -> anyhow::Result<()> {
    match grpc_error(r) {
        Some((c, m)) if c == code && m == message => Ok(()),
        _ => anyhow::bail!("expected gRPC error {code} {message:?}, got {r:?}"),
    }
}

/// Removes the given keys from every object anywhere inside `v`.
pub fn strip_keys(v: &mut Value, keys: &[&str]) {
    match v {
        Value::Object(map) => {
            for k in keys {
                map.remove(*k);
            }
            for child in map.values_mut() {
                strip_keys(child, keys);
            }
        }
        Value::Array(items) => {
            for child in items {
                strip_keys(child, keys);
            }
        }
        _ => {}
    }
}

/// Header fields that legitimately differ between servers.
pub const SERVER_IDENTITY_FIELDS: &[&str] = &["cluster_id", "member_id", "raft_term"];

/// Builds a JSON object from pairs (handy for custom observations).
pub fn object<I, K>(pairs: I) -> Value
where
    I: IntoIterator<Item = (K, Value)>,
    K: Into<String>,
{
    Value::Object(
        pairs
            .into_iter()
            .map(|(k, v)| (k.into(), v))
            .collect::<Map<_, _>>(),
    )
}
