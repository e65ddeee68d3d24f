//! The replicated command (payload of every normal Raft entry) and its answer.
//!
//! The command is fetcd's `InternalRaftRequest` protobuf; Raft entries are serialized with serde
//! (openraft's `serde` feature), so both types serialize *as their protobuf bytes*: one encoding
//! on disk, on the wire between peers, and in snapshots.

use fetcd_proto::etcdserverpb::CompactionResponse;
use fetcd_proto::etcdserverpb::DeleteRangeResponse;
use fetcd_proto::etcdserverpb::PutResponse;
use fetcd_proto::etcdserverpb::TxnResponse;
use fetcd_proto::raftpb::internal_raft_request::Request;
use fetcd_proto::raftpb::InternalRaftRequest;
use fetcd_storage::KvError;
use fetcd_storage::WriteOp;
use fetcd_storage::WriteResponse;
use prost::Message;
use serde::de::Error as _;
use serde::Deserialize;
use serde::Deserializer;
use serde::Serialize;
use serde::Serializer;

/// One client write, as agreed on by Raft.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Command(pub InternalRaftRequest);

impl Command {
    /// The storage operation this command performs.
    pub fn to_write_op(&self) -> WriteOp {
        match &self.0.request {
            Some(Request::Put(r)) => WriteOp::Put(r.clone()),
            Some(Request::DeleteRange(r)) => WriteOp::DeleteRange(r.clone()),
            Some(Request::Txn(r)) => WriteOp::Txn(r.clone()),
            Some(Request::Compaction(r)) => WriteOp::Compaction(*r),
            // Lease and alarm commands arrive with their services; none can be proposed before.
            Some(Request::LeaseGrant(_))
            | Some(Request::LeaseRevoke(_))
            | Some(Request::LeaseCheckpoint(_))
            | Some(Request::Alarm(_))
            | None => WriteOp::Noop,
        }
    }
}

impl Serialize for Command {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0.encode_to_vec())
    }
}

impl<'de> Deserialize<'de> for Command {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let b: Vec<u8> = serde_bytes_vec(d)?;
        InternalRaftRequest::decode(b.as_slice())
            .map(Command)
            .map_err(D::Error::custom)
    }
}

fn serde_bytes_vec<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("bytes")
        }
        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }
        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::new();
            while let Some(b) = seq.next_element()? {
                out.push(b);
            }
            Ok(out)
        }
    }
    d.deserialize_byte_buf(V)
}

/// The state machine's answer to one entry.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum CommandResponse {
    /// A blank or membership entry, or a command with no KV effect.
    #[default]
    None,
    /// The KV answer.
    Write(WriteResponse),
    /// The request was refused by the store; nothing was written.
    Refused(KvError),
}

impl From<Result<WriteResponse, KvError>> for CommandResponse {
    fn from(r: Result<WriteResponse, KvError>) -> Self {
        match r {
            Ok(WriteResponse::Noop) => CommandResponse::None,
            Ok(w) => CommandResponse::Write(w),
            Err(e) => CommandResponse::Refused(e),
        }
    }
}

// Wire tags for `CommandResponse`; stable, never reuse a number.
const TAG_NONE: u8 = 0;
const TAG_PUT: u8 = 1;
const TAG_DELETE: u8 = 2;
const TAG_TXN: u8 = 3;
const TAG_COMPACTION: u8 = 4;
const TAG_ERR_COMPACTED: u8 = 100;
const TAG_ERR_FUTURE_REV: u8 = 101;
const TAG_ERR_KEY_NOT_FOUND: u8 = 102;
const TAG_ERR_LEASE_NOT_FOUND: u8 = 103;

impl Serialize for CommandResponse {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (tag, bytes): (u8, Vec<u8>) = match self {
            CommandResponse::None => (TAG_NONE, vec![]),
            CommandResponse::Write(WriteResponse::Put(r)) => (TAG_PUT, r.encode_to_vec()),
            CommandResponse::Write(WriteResponse::DeleteRange(r)) => {
                (TAG_DELETE, r.encode_to_vec())
            }
            CommandResponse::Write(WriteResponse::Txn(r)) => (TAG_TXN, r.encode_to_vec()),
            CommandResponse::Write(WriteResponse::Compaction(r)) => {
                (TAG_COMPACTION, r.encode_to_vec())
            }
            CommandResponse::Write(WriteResponse::Noop) => (TAG_NONE, vec![]),
            CommandResponse::Refused(e) => (
                match e {
                    KvError::Compacted => TAG_ERR_COMPACTED,
                    KvError::FutureRevision => TAG_ERR_FUTURE_REV,
                    KvError::KeyNotFound => TAG_ERR_KEY_NOT_FOUND,
                    KvError::LeaseNotFound => TAG_ERR_LEASE_NOT_FOUND,
                    other => {
                        return Err(serde::ser::Error::custom(format!(
                            "unencodable error {other}"
                        )))
                    }
                },
                vec![],
            ),
        };
        (tag, serde_bytes_wrap(&bytes)).serialize(s)
    }
}

/// Serializes a byte slice as serde bytes (not a sequence of u8).
struct BytesRef<'a>(&'a [u8]);

impl Serialize for BytesRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

fn serde_bytes_wrap(b: &[u8]) -> BytesRef<'_> {
    BytesRef(b)
}

/// Deserializes serde bytes into a vector.
struct BytesBuf(Vec<u8>);

impl<'de> Deserialize<'de> for BytesBuf {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde_bytes_vec(d).map(BytesBuf)
    }
}

impl<'de> Deserialize<'de> for CommandResponse {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (tag, BytesBuf(b)) = <(u8, BytesBuf)>::deserialize(d)?;
        let b = b.as_slice();
        let dec = |e: prost::DecodeError| D::Error::custom(e);
        Ok(match tag {
            TAG_NONE => CommandResponse::None,
            TAG_PUT => {
                CommandResponse::Write(WriteResponse::Put(PutResponse::decode(b).map_err(dec)?))
            }
            TAG_DELETE => CommandResponse::Write(WriteResponse::DeleteRange(
                DeleteRangeResponse::decode(b).map_err(dec)?,
            )),
            TAG_TXN => {
                CommandResponse::Write(WriteResponse::Txn(TxnResponse::decode(b).map_err(dec)?))
            }
            TAG_COMPACTION => CommandResponse::Write(WriteResponse::Compaction(
                CompactionResponse::decode(b).map_err(dec)?,
            )),
            TAG_ERR_COMPACTED => CommandResponse::Refused(KvError::Compacted),
            TAG_ERR_FUTURE_REV => CommandResponse::Refused(KvError::FutureRevision),
            TAG_ERR_KEY_NOT_FOUND => CommandResponse::Refused(KvError::KeyNotFound),
            TAG_ERR_LEASE_NOT_FOUND => CommandResponse::Refused(KvError::LeaseNotFound),
            t => return Err(D::Error::custom(format!("unknown response tag {t}"))),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use fetcd_proto::etcdserverpb::PutRequest;
    use fetcd_proto::etcdserverpb::ResponseHeader;
    use fetcd_proto::raftpb::RequestHeader;

    use super::*;

    #[test]
    fn command_and_response_round_trip_through_bincode() {
        let cmd = Command(InternalRaftRequest {
            header: Some(RequestHeader {
                id: 7,
                ..Default::default()
            }),
            request: Some(Request::Put(PutRequest {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                ..Default::default()
            })),
        });
        let b = bincode::serialize(&cmd).unwrap();
        assert_eq!(bincode::deserialize::<Command>(&b).unwrap(), cmd);

        for resp in [
            CommandResponse::None,
            CommandResponse::Refused(KvError::Compacted),
            CommandResponse::Write(WriteResponse::Put(PutResponse {
                header: Some(ResponseHeader {
                    revision: 9,
                    ..Default::default()
                }),
                prev_kv: None,
            })),
        ] {
            let b = bincode::serialize(&resp).unwrap();
            assert_eq!(bincode::deserialize::<CommandResponse>(&b).unwrap(), resp);
        }
    }
}
