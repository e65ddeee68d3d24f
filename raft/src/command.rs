//! The replicated command (payload of every normal Raft entry) and its answer.
//!
//! A command is a batch of fetcd `InternalRaftRequest`s (`InternalRaftBatch`): client requests
//! that arrived together share one log append, one fdatasync and one state-machine transaction,
//! yet each is applied in order with its own revision, as if it had its own entry. Raft entries
//! are serialized with serde (openraft's `serde` feature), so the command serializes *as its
//! protobuf bytes*: one encoding on disk and between peers.
//!
//! A command is *held* as those bytes too, and only the state machine decodes them (once per
//! member, as etcd's apply unmarshals each entry). An entry is read back from the log for every
//! AppendEntries that carries it and written again by each follower; as decoded requests it was
//! decoded and re-encoded at each of those steps: 3.5 % of three members' CPU samples under
//! put-64 and the kube mix, 0.1 % since (docs/benchmarks.md).

use bytes::Bytes;
use fetcd_proto::etcdserverpb::AlarmResponse;
use fetcd_proto::etcdserverpb::CompactionResponse;
use fetcd_proto::etcdserverpb::DeleteRangeResponse;
use fetcd_proto::etcdserverpb::LeaseCheckpointResponse;
use fetcd_proto::etcdserverpb::LeaseGrantResponse;
use fetcd_proto::etcdserverpb::LeaseRevokeResponse;
use fetcd_proto::etcdserverpb::PutResponse;
use fetcd_proto::etcdserverpb::TxnResponse;
use fetcd_proto::raftpb::internal_raft_request::Request;
use fetcd_proto::raftpb::InternalRaftBatch;
use fetcd_proto::raftpb::InternalRaftRequest;
use fetcd_storage::KvError;
use fetcd_storage::LeaseStamp;
use fetcd_storage::WriteOp;
use fetcd_storage::WriteResponse;
use prost::Message;
use serde::de::Error as _;
use serde::Deserialize;
use serde::Deserializer;
use serde::Serialize;
use serde::Serializer;

/// Client writes agreed on together by Raft, as the protobuf encoding of their
/// `InternalRaftBatch` (see the module documentation).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Command {
    encoded: Bytes,
}

impl Command {
    /// A command carrying `requests`, applied in order.
    pub fn new(requests: Vec<InternalRaftRequest>) -> Self {
        Self::from_batch(&InternalRaftBatch { requests })
    }

    /// A command carrying `batch`'s requests (encoded once, here).
    pub fn from_batch(batch: &InternalRaftBatch) -> Self {
        Command {
            encoded: batch.encode_to_vec().into(),
        }
    }

    /// The requests, in apply order. Fails only on bytes no fetcd member encoded (a peer of
    /// another protocol, or memory corruption): the log's records are checksummed.
    pub fn decode(&self) -> Result<InternalRaftBatch, prost::DecodeError> {
        InternalRaftBatch::decode(self.encoded.clone())
    }
}

/// True for requests that must be proposed alone: a compaction commits the store in the middle
/// of applying, which must not split a batch (the applied marker covers whole entries).
pub fn must_propose_alone(req: &InternalRaftRequest) -> bool {
    matches!(req.request, Some(Request::Compaction(_)))
}

/// The storage operation one request performs (consumes it: values are moved, not copied).
pub fn into_write_op(req: InternalRaftRequest) -> WriteOp {
    let stamp = req
        .header
        .as_ref()
        .filter(|h| h.proposer != 0)
        .map(|h| LeaseStamp {
            member: h.proposer,
            unix_ms: h.proposed_at_unix_ms,
        });
    match req.request {
        Some(Request::Put(r)) => WriteOp::Put(r),
        Some(Request::DeleteRange(r)) => WriteOp::DeleteRange(r),
        Some(Request::Txn(r)) => WriteOp::Txn(r),
        Some(Request::Compaction(r)) => WriteOp::Compaction(r),
        Some(Request::LeaseGrant(r)) => WriteOp::LeaseGrant(r, stamp),
        Some(Request::LeaseRevoke(r)) => WriteOp::LeaseRevoke(r),
        Some(Request::LeaseCheckpoint(r)) => WriteOp::LeaseCheckpoint(r, stamp),
        Some(Request::MemberAttributes(m)) => match m.member {
            Some(member) if m.remove => WriteOp::RemoveMember(member.id),
            Some(member) => WriteOp::SetMember(member),
            None => WriteOp::Noop,
        },
        Some(Request::Alarm(r)) => WriteOp::Alarm(r),
        None => WriteOp::Noop,
    }
}

impl Serialize for Command {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.encoded)
    }
}

impl<'de> Deserialize<'de> for Command {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Command {
            encoded: serde_bytes_vec(d)?.into(),
        })
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

/// The state machine's answers to one entry, one per request of its command (none for blank and
/// membership entries).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CommandResponse(pub Vec<ApplyResult>);

/// The state machine's answer to one request.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum ApplyResult {
    /// A blank or membership entry, or a command with no KV effect.
    #[default]
    None,
    /// The KV answer.
    Write(WriteResponse),
    /// The request was refused by the store; nothing was written.
    Refused(KvError),
}

impl From<Result<WriteResponse, KvError>> for ApplyResult {
    fn from(r: Result<WriteResponse, KvError>) -> Self {
        match r {
            Ok(WriteResponse::Noop) => ApplyResult::None,
            Ok(w) => ApplyResult::Write(w),
            Err(e) => ApplyResult::Refused(e),
        }
    }
}

// Wire tags for `ApplyResult`; stable, never reuse a number.
const TAG_NONE: u8 = 0;
const TAG_PUT: u8 = 1;
const TAG_DELETE: u8 = 2;
const TAG_TXN: u8 = 3;
const TAG_COMPACTION: u8 = 4;
const TAG_LEASE_GRANT: u8 = 5;
const TAG_LEASE_REVOKE: u8 = 6;
const TAG_LEASE_CHECKPOINT: u8 = 7;
const TAG_ALARM: u8 = 8;
const TAG_ERR_COMPACTED: u8 = 100;
const TAG_ERR_FUTURE_REV: u8 = 101;
const TAG_ERR_KEY_NOT_FOUND: u8 = 102;
const TAG_ERR_LEASE_NOT_FOUND: u8 = 103;
const TAG_ERR_LEASE_EXISTS: u8 = 104;
const TAG_ERR_LEASE_TTL_TOO_LARGE: u8 = 105;
const TAG_ERR_NO_SPACE: u8 = 106;
const TAG_ERR_CORRUPT: u8 = 107;

impl Serialize for ApplyResult {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (tag, bytes): (u8, Vec<u8>) = match self {
            ApplyResult::None => (TAG_NONE, vec![]),
            ApplyResult::Write(WriteResponse::Put(r)) => (TAG_PUT, r.encode_to_vec()),
            ApplyResult::Write(WriteResponse::DeleteRange(r)) => (TAG_DELETE, r.encode_to_vec()),
            ApplyResult::Write(WriteResponse::Txn(r)) => (TAG_TXN, r.encode_to_vec()),
            ApplyResult::Write(WriteResponse::Compaction(r)) => (TAG_COMPACTION, r.encode_to_vec()),
            ApplyResult::Write(WriteResponse::LeaseGrant(r)) => {
                (TAG_LEASE_GRANT, r.encode_to_vec())
            }
            ApplyResult::Write(WriteResponse::LeaseRevoke(r)) => {
                (TAG_LEASE_REVOKE, r.encode_to_vec())
            }
            ApplyResult::Write(WriteResponse::LeaseCheckpoint(r)) => {
                (TAG_LEASE_CHECKPOINT, r.encode_to_vec())
            }
            ApplyResult::Write(WriteResponse::Alarm(r)) => (TAG_ALARM, r.encode_to_vec()),
            ApplyResult::Write(WriteResponse::Noop) => (TAG_NONE, vec![]),
            ApplyResult::Refused(e) => (
                match e {
                    KvError::Compacted => TAG_ERR_COMPACTED,
                    KvError::FutureRevision => TAG_ERR_FUTURE_REV,
                    KvError::KeyNotFound => TAG_ERR_KEY_NOT_FOUND,
                    KvError::LeaseNotFound => TAG_ERR_LEASE_NOT_FOUND,
                    KvError::LeaseExists => TAG_ERR_LEASE_EXISTS,
                    KvError::LeaseTtlTooLarge => TAG_ERR_LEASE_TTL_TOO_LARGE,
                    KvError::NoSpace => TAG_ERR_NO_SPACE,
                    KvError::Corrupt => TAG_ERR_CORRUPT,
                    other => {
                        return Err(serde::ser::Error::custom(format!(
                            "unencodable error {other}"
                        )))
                    }
                },
                vec![],
            ),
        };
        (tag, BytesRef(&bytes)).serialize(s)
    }
}

/// Serializes a byte slice as serde bytes (not a sequence of u8).
struct BytesRef<'a>(&'a [u8]);

impl Serialize for BytesRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

/// Deserializes serde bytes into a vector.
struct BytesBuf(Vec<u8>);

impl<'de> Deserialize<'de> for BytesBuf {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde_bytes_vec(d).map(BytesBuf)
    }
}

impl<'de> Deserialize<'de> for ApplyResult {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (tag, BytesBuf(b)) = <(u8, BytesBuf)>::deserialize(d)?;
        let b = b.as_slice();
        let dec = |e: prost::DecodeError| D::Error::custom(e);
        Ok(match tag {
            TAG_NONE => ApplyResult::None,
            TAG_PUT => ApplyResult::Write(WriteResponse::Put(PutResponse::decode(b).map_err(dec)?)),
            TAG_DELETE => ApplyResult::Write(WriteResponse::DeleteRange(
                DeleteRangeResponse::decode(b).map_err(dec)?,
            )),
            TAG_TXN => ApplyResult::Write(WriteResponse::Txn(TxnResponse::decode(b).map_err(dec)?)),
            TAG_COMPACTION => ApplyResult::Write(WriteResponse::Compaction(
                CompactionResponse::decode(b).map_err(dec)?,
            )),
            TAG_LEASE_GRANT => ApplyResult::Write(WriteResponse::LeaseGrant(
                LeaseGrantResponse::decode(b).map_err(dec)?,
            )),
            TAG_LEASE_REVOKE => ApplyResult::Write(WriteResponse::LeaseRevoke(
                LeaseRevokeResponse::decode(b).map_err(dec)?,
            )),
            TAG_LEASE_CHECKPOINT => ApplyResult::Write(WriteResponse::LeaseCheckpoint(
                LeaseCheckpointResponse::decode(b).map_err(dec)?,
            )),
            TAG_ALARM => {
                ApplyResult::Write(WriteResponse::Alarm(AlarmResponse::decode(b).map_err(dec)?))
            }
            TAG_ERR_COMPACTED => ApplyResult::Refused(KvError::Compacted),
            TAG_ERR_FUTURE_REV => ApplyResult::Refused(KvError::FutureRevision),
            TAG_ERR_KEY_NOT_FOUND => ApplyResult::Refused(KvError::KeyNotFound),
            TAG_ERR_LEASE_NOT_FOUND => ApplyResult::Refused(KvError::LeaseNotFound),
            TAG_ERR_LEASE_EXISTS => ApplyResult::Refused(KvError::LeaseExists),
            TAG_ERR_LEASE_TTL_TOO_LARGE => ApplyResult::Refused(KvError::LeaseTtlTooLarge),
            TAG_ERR_NO_SPACE => ApplyResult::Refused(KvError::NoSpace),
            TAG_ERR_CORRUPT => ApplyResult::Refused(KvError::Corrupt),
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
        let put = |k: &[u8]| InternalRaftRequest {
            header: Some(RequestHeader {
                id: 7,
                ..Default::default()
            }),
            request: Some(Request::Put(PutRequest {
                key: k.to_vec(),
                value: b"v".to_vec(),
                ..Default::default()
            })),
        };
        let cmd = Command::new(vec![put(b"a"), put(b"b")]);
        let b = bincode::serialize(&cmd).unwrap();
        assert_eq!(bincode::deserialize::<Command>(&b).unwrap(), cmd);
        assert_eq!(
            bincode::deserialize::<Command>(&b)
                .unwrap()
                .decode()
                .unwrap()
                .requests,
            vec![put(b"a"), put(b"b")]
        );
        let resp = CommandResponse(vec![
            ApplyResult::None,
            ApplyResult::Refused(KvError::KeyNotFound),
        ]);
        let b = bincode::serialize(&resp).unwrap();
        assert_eq!(bincode::deserialize::<CommandResponse>(&b).unwrap(), resp);

        for resp in [
            ApplyResult::None,
            ApplyResult::Refused(KvError::Compacted),
            ApplyResult::Refused(KvError::LeaseExists),
            ApplyResult::Refused(KvError::LeaseTtlTooLarge),
            ApplyResult::Refused(KvError::NoSpace),
            ApplyResult::Refused(KvError::Corrupt),
            ApplyResult::Write(WriteResponse::Alarm(AlarmResponse {
                header: None,
                alarms: vec![fetcd_proto::etcdserverpb::AlarmMember {
                    member_id: 9,
                    alarm: 1,
                }],
            })),
            ApplyResult::Write(WriteResponse::LeaseGrant(LeaseGrantResponse {
                header: None,
                id: 7,
                ttl: 60,
                error: String::new(),
            })),
            ApplyResult::Write(WriteResponse::LeaseRevoke(LeaseRevokeResponse {
                header: Some(ResponseHeader {
                    revision: 3,
                    ..Default::default()
                }),
            })),
            ApplyResult::Write(WriteResponse::LeaseCheckpoint(
                LeaseCheckpointResponse::default(),
            )),
            ApplyResult::Write(WriteResponse::Put(PutResponse {
                header: Some(ResponseHeader {
                    revision: 9,
                    ..Default::default()
                }),
                prev_kv: None,
            })),
        ] {
            let b = bincode::serialize(&resp).unwrap();
            assert_eq!(bincode::deserialize::<ApplyResult>(&b).unwrap(), resp);
        }
    }

    /// Logs and peers of earlier builds hold commands as bincode bytes of the batch's protobuf
    /// encoding (a u64 length, then the bytes); a command must still be written and read so.
    #[test]
    fn a_command_is_stored_and_sent_as_its_protobuf_bytes() {
        let batch = InternalRaftBatch {
            requests: vec![InternalRaftRequest {
                header: None,
                request: Some(Request::Put(PutRequest {
                    key: b"k".to_vec(),
                    value: b"value".to_vec(),
                    lease: 3,
                    ..Default::default()
                })),
            }],
        };
        let proto = batch.encode_to_vec();
        let mut expected = (proto.len() as u64).to_le_bytes().to_vec();
        expected.extend_from_slice(&proto);
        assert_eq!(
            bincode::serialize(&Command::from_batch(&batch)).unwrap(),
            expected
        );
        assert_eq!(
            bincode::deserialize::<Command>(&expected)
                .unwrap()
                .decode()
                .unwrap(),
            batch
        );
    }

    #[test]
    fn bytes_that_are_no_batch_fail_to_decode() {
        assert!(Command::default().decode().unwrap().requests.is_empty());
        // Field 1 (a request) announcing 255 bytes that never come.
        let mut torn = 2u64.to_le_bytes().to_vec();
        torn.extend_from_slice(&[0x0a, 0xff]);
        let cmd: Command = bincode::deserialize(&torn).unwrap();
        assert!(cmd.decode().is_err());
    }
}
