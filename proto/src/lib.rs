//! etcd v3 wire types for fetcd.
//!
//! fetcd speaks etcd's gRPC API so that unmodified etcd clients (etcdctl, Go
//! `clientv3`, the Rust `etcd-client` crate, ...) can use it. This crate holds
//! the protobuf definitions of that API, written for fetcd under `proto/`,
//! and the Rust code `tonic`/`prost` generate from them:
//!
//! * [`mvccpb`] -- `KeyValue` and watch `Event`s.
//! * [`authpb`] -- users, roles and permissions.
//! * [`etcdserverpb`] -- the request/response messages and the `KV`, `Watch`,
//!   `Lease`, `Cluster`, `Maintenance` and `Auth` services (both server traits
//!   and clients).
//! * [`raftpb`] -- fetcd's own replicated command (`InternalRaftRequest`),
//!   which is internal and *not* etcd's format.
//!
//! Protobuf identifies fields by number, not by name, so the package names,
//! message names and above all the field numbers of the etcd packages must
//! match etcd exactly. Changing one silently breaks compatibility with real
//! clients; the tests at the bottom of this file pin a few of them.
//!
//! [`status`] has the exact error messages etcd returns, which clients match
//! on textually.

/// etcd's MVCC types (`mvccpb` package): `KeyValue` and `Event`.
#[allow(
    clippy::all,
    clippy::pedantic,
    unused_qualifications,
    missing_docs,
    rustdoc::all
)]
pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

/// etcd's auth types (`authpb` package): `User`, `Role`, `Permission`.
#[allow(
    clippy::all,
    clippy::pedantic,
    unused_qualifications,
    missing_docs,
    rustdoc::all
)]
pub mod authpb {
    tonic::include_proto!("authpb");
}

/// etcd's v3 API (`etcdserverpb` package): messages, service traits
/// (`*_server`) and clients (`*_client`).
#[allow(
    clippy::all,
    clippy::pedantic,
    unused_qualifications,
    missing_docs,
    rustdoc::all
)]
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

/// fetcd's internal Raft log payload (`fetcdraftpb` package). Not part of
/// etcd's wire protocol.
#[allow(
    clippy::all,
    clippy::pedantic,
    unused_qualifications,
    missing_docs,
    rustdoc::all
)]
pub mod raftpb {
    tonic::include_proto!("fetcdraftpb");
}

/// Watch responses with events encoded once, however many watchers receive them.
///
/// Protobuf encodes an embedded message exactly like a `bytes` field holding that message's
/// encoding (tag, length, payload). So [`wire::EncodedWatchResponse`], whose `events` are the
/// encoded `mvccpb.Event`s, puts the same bytes on the wire as `etcdserverpb.WatchResponse`
/// with those events: clients decode it as a `WatchResponse`. The server encodes each event
/// once (a [`bytes::Bytes`] shared by every watcher it goes to) instead of once per watcher.
pub mod wire {
    use std::sync::Arc;

    use bytes::Buf;
    use bytes::BufMut;
    use bytes::Bytes;
    use prost::encoding;

    use crate::etcdserverpb::RangeResponse;
    use crate::etcdserverpb::ResponseHeader;
    use crate::etcdserverpb::WatchResponse;

    /// Encoded `mvccpb.Event`s a response carries in whatever form the server shares them, so
    /// a response to one of ten thousand watchers holds a reference to the revision's events
    /// instead of a copy of each event's handle (a contended reference count per event).
    pub trait EncodedEvents: Send + Sync + std::fmt::Debug {
        /// Calls `f` with runs of the events already encoded as `WatchResponse.events` fields
        /// (see [`put_event_field`]), in order: a response copies each run whole.
        fn for_each_run(&self, f: &mut dyn FnMut(&[u8]));
    }

    /// Appends `ev`, an encoded `mvccpb.Event`, as a `WatchResponse.events` field (11): tag,
    /// length, event. Events framed once this way are shared by every watcher they go to.
    pub fn put_event_field(out: &mut Vec<u8>, ev: &[u8]) {
        encoding::encode_key(11, encoding::WireType::LengthDelimited, out);
        encoding::encode_varint(ev.len() as u64, out);
        out.extend_from_slice(ev);
    }

    /// The bytes [`put_event_field`] appends for `ev`: field 11's tag, length and bytes.
    pub fn event_field_len(ev: &[u8]) -> usize {
        encoding::key_len(11) + encoding::encoded_len_varint(ev.len() as u64) + ev.len()
    }

    /// `etcdserverpb.WatchResponse` with pre-encoded events (same field numbers).
    #[derive(Clone, Debug, Default)]
    pub struct EncodedWatchResponse {
        /// `WatchResponse.header` (1).
        pub header: Option<ResponseHeader>,
        /// `WatchResponse.watch_id` (2).
        pub watch_id: i64,
        /// `WatchResponse.created` (3).
        pub created: bool,
        /// `WatchResponse.canceled` (4).
        pub canceled: bool,
        /// `WatchResponse.compact_revision` (5).
        pub compact_revision: i64,
        /// `WatchResponse.cancel_reason` (6).
        pub cancel_reason: String,
        /// `WatchResponse.fragment` (7).
        pub fragment: bool,
        /// `WatchResponse.events` (11), each an encoded `mvccpb.Event`.
        pub events: Vec<Bytes>,
        /// More of `WatchResponse.events` (11), after `events`. Decoding fills only `events`.
        pub shared_events: Option<Arc<dyn EncodedEvents>>,
    }

    impl prost::Message for EncodedWatchResponse {
        fn encode_raw(&self, buf: &mut impl BufMut) {
            if let Some(h) = &self.header {
                encoding::message::encode(1, h, buf);
            }
            if self.watch_id != 0 {
                encoding::int64::encode(2, &self.watch_id, buf);
            }
            if self.created {
                encoding::bool::encode(3, &self.created, buf);
            }
            if self.canceled {
                encoding::bool::encode(4, &self.canceled, buf);
            }
            if self.compact_revision != 0 {
                encoding::int64::encode(5, &self.compact_revision, buf);
            }
            if !self.cancel_reason.is_empty() {
                encoding::string::encode(6, &self.cancel_reason, buf);
            }
            if self.fragment {
                encoding::bool::encode(7, &self.fragment, buf);
            }
            encoding::bytes::encode_repeated(11, &self.events, buf);
            if let Some(shared) = &self.shared_events {
                shared.for_each_run(&mut |run| buf.put_slice(run));
            }
        }

        fn merge_field(
            &mut self,
            tag: u32,
            wire_type: encoding::WireType,
            buf: &mut impl Buf,
            ctx: encoding::DecodeContext,
        ) -> Result<(), prost::DecodeError> {
            match tag {
                1 => encoding::message::merge(
                    wire_type,
                    self.header.get_or_insert_with(Default::default),
                    buf,
                    ctx,
                ),
                2 => encoding::int64::merge(wire_type, &mut self.watch_id, buf, ctx),
                3 => encoding::bool::merge(wire_type, &mut self.created, buf, ctx),
                4 => encoding::bool::merge(wire_type, &mut self.canceled, buf, ctx),
                5 => encoding::int64::merge(wire_type, &mut self.compact_revision, buf, ctx),
                6 => encoding::string::merge(wire_type, &mut self.cancel_reason, buf, ctx),
                7 => encoding::bool::merge(wire_type, &mut self.fragment, buf, ctx),
                11 => encoding::bytes::merge_repeated(wire_type, &mut self.events, buf, ctx),
                _ => encoding::skip_field(wire_type, tag, buf, ctx),
            }
        }

        fn encoded_len(&self) -> usize {
            let mut len = self
                .header
                .as_ref()
                .map_or(0, |h| encoding::message::encoded_len(1, h));
            if self.watch_id != 0 {
                len += encoding::int64::encoded_len(2, &self.watch_id);
            }
            len += usize::from(self.created) * encoding::bool::encoded_len(3, &true);
            len += usize::from(self.canceled) * encoding::bool::encoded_len(4, &true);
            if self.compact_revision != 0 {
                len += encoding::int64::encoded_len(5, &self.compact_revision);
            }
            if !self.cancel_reason.is_empty() {
                len += encoding::string::encoded_len(6, &self.cancel_reason);
            }
            len += usize::from(self.fragment) * encoding::bool::encoded_len(7, &true);
            len += encoding::bytes::encoded_len_repeated(11, &self.events);
            if let Some(shared) = &self.shared_events {
                shared.for_each_run(&mut |run| len += run.len());
            }
            len
        }

        fn clear(&mut self) {
            *self = EncodedWatchResponse::default();
        }
    }

    impl From<WatchResponse> for EncodedWatchResponse {
        /// Encodes `r`'s events (for the rare responses not built from shared events).
        fn from(r: WatchResponse) -> Self {
            use prost::Message;
            EncodedWatchResponse {
                header: r.header,
                watch_id: r.watch_id,
                created: r.created,
                canceled: r.canceled,
                compact_revision: r.compact_revision,
                cancel_reason: r.cancel_reason,
                fragment: r.fragment,
                events: r
                    .events
                    .iter()
                    .map(|e| Bytes::from(e.encode_to_vec()))
                    .collect(),
                shared_events: None,
            }
        }
    }

    /// `etcdserverpb.RangeResponse` with pre-encoded key-values (same field numbers), so a
    /// list page copies each stored `mvccpb.KeyValue` into the response once, as it is kept,
    /// instead of cloning it field by field and encoding it again.
    #[derive(Clone, Debug, Default, PartialEq)]
    pub struct EncodedRangeResponse {
        /// `RangeResponse.header` (1).
        pub header: Option<ResponseHeader>,
        /// `RangeResponse.kvs` (2), each an encoded `mvccpb.KeyValue`.
        pub kvs: Vec<Bytes>,
        /// `RangeResponse.more` (3).
        pub more: bool,
        /// `RangeResponse.count` (4).
        pub count: i64,
    }

    impl prost::Message for EncodedRangeResponse {
        fn encode_raw(&self, buf: &mut impl BufMut) {
            if let Some(h) = &self.header {
                encoding::message::encode(1, h, buf);
            }
            encoding::bytes::encode_repeated(2, &self.kvs, buf);
            if self.more {
                encoding::bool::encode(3, &self.more, buf);
            }
            if self.count != 0 {
                encoding::int64::encode(4, &self.count, buf);
            }
        }

        fn merge_field(
            &mut self,
            tag: u32,
            wire_type: encoding::WireType,
            buf: &mut impl Buf,
            ctx: encoding::DecodeContext,
        ) -> Result<(), prost::DecodeError> {
            match tag {
                1 => encoding::message::merge(
                    wire_type,
                    self.header.get_or_insert_with(Default::default),
                    buf,
                    ctx,
                ),
                2 => encoding::bytes::merge_repeated(wire_type, &mut self.kvs, buf, ctx),
                3 => encoding::bool::merge(wire_type, &mut self.more, buf, ctx),
                4 => encoding::int64::merge(wire_type, &mut self.count, buf, ctx),
                _ => encoding::skip_field(wire_type, tag, buf, ctx),
            }
        }

        fn encoded_len(&self) -> usize {
            let mut len = self
                .header
                .as_ref()
                .map_or(0, |h| encoding::message::encoded_len(1, h));
            len += encoding::bytes::encoded_len_repeated(2, &self.kvs);
            len += usize::from(self.more) * encoding::bool::encoded_len(3, &true);
            if self.count != 0 {
                len += encoding::int64::encoded_len(4, &self.count);
            }
            len
        }

        fn clear(&mut self) {
            *self = EncodedRangeResponse::default();
        }
    }

    impl From<RangeResponse> for EncodedRangeResponse {
        /// Encodes `r`'s key-values (for the ranges that sort, filter or strip values).
        fn from(r: RangeResponse) -> Self {
            use prost::Message;
            EncodedRangeResponse {
                header: r.header,
                kvs: r
                    .kvs
                    .iter()
                    .map(|kv| Bytes::from(kv.encode_to_vec()))
                    .collect(),
                more: r.more,
                count: r.count,
            }
        }
    }

    /// prost's gRPC codec, except that the encoder reserves a message's whole encoded length
    /// before writing it, into a buffer that starts at `BUFFER` bytes and is handed to HTTP/2
    /// once it holds `YIELD` bytes.
    #[derive(Debug, Clone)]
    pub struct BufferedCodec<T, U, const BUFFER: usize, const YIELD: usize>(
        std::marker::PhantomData<(T, U)>,
    );

    /// Range's codec. tonic's buffer starts at 8 KiB and would otherwise grow by reallocation
    /// while a list page (hundreds of KiB) is written into it, copying what is there each time.
    pub type SizedCodec<T, U> = BufferedCodec<T, U, DEFAULT_BUFFER, YIELD_THRESHOLD>;

    /// tonic's own starting buffer size: enough for unary answers, whose one message is
    /// reserved whole anyway.
    pub const DEFAULT_BUFFER: usize = 8 * 1024;

    /// tonic's default: a response stream's buffer is handed to HTTP/2 once it holds this much.
    const YIELD_THRESHOLD: usize = 32 * 1024;

    /// The Watch stream's codec. tonic encodes every response ready on a stream into one buffer
    /// until it holds the yield threshold; a watch stream's responses are small and many (one per
    /// watcher per revision), and from 8 KiB the buffer reallocated through 16, 32 and 64 KiB
    /// for every batch, copying ~1.7 times the bytes it held (6.5 % of the server's CPU with
    /// 10,000 watchers). Starting at twice tonic's threshold, a batch and the next one's start
    /// fit in one allocation.
    ///
    /// It hands the buffer on at [`WATCH_YIELD`] rather than tonic's 32 KiB: once the
    /// allocation is used up, the responses encoded since the last hand-off are copied to the
    /// next one, and with 32 KiB hand-offs that was up to half of what a busy stream sent
    /// (`BytesMut::reserve_inner`, 7.5 % of the server's CPU with 10,000 watchers).
    pub type WatchCodec<T, U> = BufferedCodec<T, U, { 2 * YIELD_THRESHOLD }, WATCH_YIELD>;

    /// A watch stream's hand-off size: about one HTTP/2 DATA frame at the 16 KiB maximum that
    /// grpc-go's and tonic's clients advertise. 8 KiB cost more per frame than it saved in
    /// copies (100 watchers on one stream, alternating runs).
    pub const WATCH_YIELD: usize = 16 * 1024;

    impl<T, U, const BUFFER: usize, const YIELD: usize> Default for BufferedCodec<T, U, BUFFER, YIELD> {
        fn default() -> Self {
            BufferedCodec(std::marker::PhantomData)
        }
    }

    /// [`BufferedCodec`]'s encoder.
    #[derive(Debug, Clone)]
    pub struct SizedEncoder<T, const BUFFER: usize, const YIELD: usize>(
        std::marker::PhantomData<T>,
    );

    impl<T: prost::Message, const BUFFER: usize, const YIELD: usize> tonic::codec::Encoder
        for SizedEncoder<T, BUFFER, YIELD>
    {
        type Item = T;
        type Error = tonic::Status;

        fn encode(
            &mut self,
            item: T,
            buf: &mut tonic::codec::EncodeBuf<'_>,
        ) -> Result<(), tonic::Status> {
            buf.reserve(item.encoded_len());
            item.encode(buf)
                .map_err(|e| tonic::Status::internal(format!("encoding a response: {e}")))
        }

        fn buffer_settings(&self) -> tonic::codec::BufferSettings {
            tonic::codec::BufferSettings::new(BUFFER, YIELD)
        }
    }

    impl<T, U, const BUFFER: usize, const YIELD: usize> tonic::codec::Codec
        for BufferedCodec<T, U, BUFFER, YIELD>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = SizedEncoder<T, BUFFER, YIELD>;
        type Decoder = <tonic_prost::ProstCodec<T, U> as tonic::codec::Codec>::Decoder;

        fn encoder(&mut self) -> Self::Encoder {
            SizedEncoder(std::marker::PhantomData)
        }

        fn decoder(&mut self) -> Self::Decoder {
            tonic_prost::ProstCodec::<T, U>::raw_decoder(tonic::codec::BufferSettings::default())
        }
    }

    /// The Watch server trait and service answering with [`EncodedWatchResponse`], and the KV
    /// ones answering Range with [`EncodedRangeResponse`].
    #[allow(
        clippy::all,
        clippy::pedantic,
        unused_qualifications,
        missing_docs,
        rustdoc::all
    )]
    mod generated {
        include!(concat!(env!("OUT_DIR"), "/etcdserverpb.Watch.rs"));
        include!(concat!(env!("OUT_DIR"), "/etcdserverpb.KV.rs"));
    }
    /// The KV server trait (`KV`) and service (`KVServer`) answering Range with
    /// [`EncodedRangeResponse`] (named after the proto service, whose name is in the routes).
    pub use generated::k_v_server as kv_server;
    pub use generated::watch_server;
}

/// etcd's gRPC error messages, verbatim.
///
/// Clients (Go `clientv3` in particular) map errors back to typed errors by
/// comparing the status message text, so these strings must be byte-for-byte
/// identical to etcd's. Each constant notes the gRPC status code etcd pairs
/// it with; use the same code.
pub mod status {
    // --- KV ---------------------------------------------------------------

    /// `InvalidArgument`.
    pub const ERR_EMPTY_KEY: &str = "etcdserver: key is not provided";

    /// `InvalidArgument`: a Range sort order or target outside the enum.
    pub const ERR_INVALID_SORT_OPTION: &str = "etcdserver: invalid sort option";
    /// `InvalidArgument`.
    pub const ERR_KEY_NOT_FOUND: &str = "etcdserver: key not found";
    /// `InvalidArgument`.
    pub const ERR_VALUE_PROVIDED: &str = "etcdserver: value is provided";
    /// `InvalidArgument`.
    pub const ERR_LEASE_PROVIDED: &str = "etcdserver: lease is provided";
    /// `InvalidArgument`.
    pub const ERR_TTL_ZERO: &str = "etcdserver: ttl is 0";
    /// `InvalidArgument`.
    pub const ERR_TOO_MANY_OPS: &str = "etcdserver: too many operations in txn request";
    /// `InvalidArgument`.
    pub const ERR_DUPLICATE_KEY: &str = "etcdserver: duplicate key given in txn request";
    /// `OutOfRange`.
    pub const ERR_COMPACTED: &str = "etcdserver: mvcc: required revision has been compacted";
    /// `OutOfRange`.
    pub const ERR_FUTURE_REV: &str = "etcdserver: mvcc: required revision is a future revision";
    /// `ResourceExhausted`.
    pub const ERR_NO_SPACE: &str = "etcdserver: mvcc: database space exceeded";

    // --- Lease ------------------------------------------------------------

    /// `NotFound`.
    pub const ERR_LEASE_NOT_FOUND: &str = "etcdserver: requested lease not found";
    /// `FailedPrecondition`.
    pub const ERR_LEASE_EXIST: &str = "etcdserver: lease already exists";
    /// `OutOfRange`.
    pub const ERR_LEASE_TTL_TOO_LARGE: &str = "etcdserver: too large lease TTL";

    // --- Cluster ----------------------------------------------------------

    /// `FailedPrecondition`.
    pub const ERR_MEMBER_EXIST: &str = "etcdserver: member ID already exist";
    /// `FailedPrecondition`.
    pub const ERR_PEER_URL_EXIST: &str = "etcdserver: Peer URLs already exists";
    /// `FailedPrecondition`.
    pub const ERR_MEMBER_NOT_ENOUGH_STARTED: &str =
        "etcdserver: re-configuration failed due to not enough started members";
    /// `InvalidArgument`.
    pub const ERR_MEMBER_BAD_URLS: &str = "etcdserver: given member URLs are invalid";
    /// `NotFound`.
    pub const ERR_MEMBER_NOT_FOUND: &str = "etcdserver: member not found";
    /// `FailedPrecondition`.
    pub const ERR_MEMBER_NOT_LEARNER: &str = "etcdserver: can only promote a learner member";
    /// `FailedPrecondition`.
    pub const ERR_LEARNER_NOT_READY: &str =
        "etcdserver: can only promote a learner member which is in sync with leader";
    /// `FailedPrecondition`.
    pub const ERR_TOO_MANY_LEARNERS: &str = "etcdserver: too many learner members in cluster";

    // --- Request limits ---------------------------------------------------

    /// `InvalidArgument`.
    pub const ERR_REQUEST_TOO_LARGE: &str = "etcdserver: request is too large";
    /// `ResourceExhausted`.
    pub const ERR_TOO_MANY_REQUESTS: &str = "etcdserver: too many requests";

    // --- Auth -------------------------------------------------------------

    /// `FailedPrecondition`.
    pub const ERR_ROOT_USER_NOT_EXIST: &str = "etcdserver: root user does not exist";
    /// `FailedPrecondition`.
    pub const ERR_ROOT_ROLE_NOT_EXIST: &str = "etcdserver: root user does not have root role";
    /// `FailedPrecondition`.
    pub const ERR_USER_ALREADY_EXIST: &str = "etcdserver: user name already exists";
    /// `InvalidArgument`.
    pub const ERR_USER_EMPTY: &str = "etcdserver: user name is empty";
    /// `FailedPrecondition`.
    pub const ERR_USER_NOT_FOUND: &str = "etcdserver: user name not found";
    /// `FailedPrecondition`.
    pub const ERR_ROLE_ALREADY_EXIST: &str = "etcdserver: role name already exists";
    /// `FailedPrecondition`.
    pub const ERR_ROLE_NOT_FOUND: &str = "etcdserver: role name not found";
    /// `InvalidArgument`.
    pub const ERR_ROLE_EMPTY: &str = "etcdserver: role name is empty";
    /// `InvalidArgument`.
    pub const ERR_AUTH_FAILED: &str =
        "etcdserver: authentication failed, invalid user ID or password";
    /// `PermissionDenied`.
    pub const ERR_PERMISSION_DENIED: &str = "etcdserver: permission denied";
    /// `FailedPrecondition`.
    pub const ERR_ROLE_NOT_GRANTED: &str = "etcdserver: role is not granted to the user";
    /// `FailedPrecondition`.
    pub const ERR_PERMISSION_NOT_GRANTED: &str =
        "etcdserver: permission is not granted to the role";
    /// `FailedPrecondition`.
    pub const ERR_AUTH_NOT_ENABLED: &str = "etcdserver: authentication is not enabled";
    /// `Unauthenticated`.
    pub const ERR_INVALID_AUTH_TOKEN: &str = "etcdserver: invalid auth token";
    /// `InvalidArgument`.
    pub const ERR_INVALID_AUTH_MGMT: &str = "etcdserver: invalid auth management";

    // --- Server / Raft state ----------------------------------------------

    /// `Unavailable`.
    pub const ERR_NO_LEADER: &str = "etcdserver: no leader";
    /// `FailedPrecondition`.
    pub const ERR_NOT_LEADER: &str = "etcdserver: not leader";
    /// `Unavailable`.
    pub const ERR_LEADER_CHANGED: &str = "etcdserver: leader changed";
    /// `Unavailable`.
    pub const ERR_NOT_CAPABLE: &str = "etcdserver: not capable";
    /// `Unavailable`.
    pub const ERR_STOPPED: &str = "etcdserver: server stopped";
    /// `Unavailable`.
    pub const ERR_TIMEOUT: &str = "etcdserver: request timed out";
    /// `Unavailable`.
    pub const ERR_TIMEOUT_DUE_TO_LEADER_FAIL: &str =
        "etcdserver: request timed out, possibly due to previous leader failure";
    /// `Unavailable`.
    pub const ERR_TIMEOUT_DUE_TO_CONNECTION_LOST: &str =
        "etcdserver: request timed out, possibly due to connection lost";
    /// `Unavailable`.
    pub const ERR_TIMEOUT_LEADER_TRANSFER: &str =
        "etcdserver: request timed out, leader transfer took too long";
    /// `Unavailable`.
    pub const ERR_UNHEALTHY: &str = "etcdserver: unhealthy cluster";
    /// `DataLoss`.
    pub const ERR_CORRUPT: &str = "etcdserver: corrupt cluster";
    /// `Unavailable`.
    pub const ERR_NOT_SUPPORTED_FOR_LEARNER: &str = "etcdserver: rpc not supported for learner";
    /// `FailedPrecondition`.
    pub const ERR_BAD_LEADER_TRANSFEREE: &str = "etcdserver: bad leader transferee";

    // --- Downgrade --------------------------------------------------------

    /// `Unavailable`.
    pub const ERR_CLUSTER_VERSION_UNAVAILABLE: &str =
        "etcdserver: cluster version not found during downgrade";
    /// `InvalidArgument`.
    pub const ERR_WRONG_DOWNGRADE_VERSION_FORMAT: &str =
        "etcdserver: wrong downgrade target version format";
    /// `InvalidArgument`.
    pub const ERR_INVALID_DOWNGRADE_TARGET_VERSION: &str =
        "etcdserver: invalid downgrade target version";
    /// `FailedPrecondition`.
    pub const ERR_DOWNGRADE_IN_PROCESS: &str =
        "etcdserver: cluster has a downgrade job in progress";
    /// `FailedPrecondition`.
    pub const ERR_NO_INFLIGHT_DOWNGRADE: &str = "etcdserver: no inflight downgrade job";
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::etcdserverpb::{compare, Compare, PutRequest, RangeRequest};
    use super::mvccpb::KeyValue;
    use super::raftpb::{internal_raft_request, InternalRaftRequest, RequestHeader};

    #[test]
    fn put_request_field_numbers() {
        let put = PutRequest {
            key: b"a".to_vec(),
            ..Default::default()
        };
        assert_eq!(put.encode_to_vec(), vec![0x0a, 0x01, b'a']);

        // prev_kv is field 4, varint: tag (4 << 3) | 0 = 0x20.
        let put = PutRequest {
            prev_kv: true,
            ..Default::default()
        };
        assert_eq!(put.encode_to_vec(), vec![0x20, 0x01]);

        // lease is field 3: tag 0x18.
        let put = PutRequest {
            lease: 7,
            ..Default::default()
        };
        assert_eq!(put.encode_to_vec(), vec![0x18, 0x07]);
    }

    #[test]
    fn range_request_field_numbers() {
        // range_end = 2 (tag 0x12), limit = 3 (0x18), count_only = 9 (0x48),
        // max_create_revision = 13 (0x68).
        let req = RangeRequest {
            key: b"a".to_vec(),
            range_end: b"b".to_vec(),
            limit: 1,
            count_only: true,
            max_create_revision: 2,
            ..Default::default()
        };
        assert_eq!(
            req.encode_to_vec(),
            vec![0x0a, 0x01, b'a', 0x12, 0x01, b'b', 0x18, 0x01, 0x48, 0x01, 0x68, 0x02]
        );
    }

    #[test]
    fn compare_target_union_field_numbers() {
        let cmp = Compare {
            target_union: Some(compare::TargetUnion::ModRevision(5)),
            ..Default::default()
        };
        // mod_revision is field 6: tag 0x30.
        assert_eq!(cmp.encode_to_vec(), vec![0x30, 0x05]);

        // range_end is field 64, length-delimited: tag varint (64 << 3) | 2 = 0x202.
        let cmp = Compare {
            range_end: b"z".to_vec(),
            ..Default::default()
        };
        assert_eq!(cmp.encode_to_vec(), vec![0x82, 0x04, 0x01, b'z']);
    }

    #[test]
    fn key_value_field_numbers() {
        let kv = KeyValue {
            mod_revision: 1,
            lease: 2,
            ..Default::default()
        };
        assert_eq!(kv.encode_to_vec(), vec![0x18, 0x01, 0x30, 0x02]);
    }

    #[test]
    fn internal_raft_request_round_trip() {
        let req = InternalRaftRequest {
            header: Some(RequestHeader {
                id: 42,
                username: "root".into(),
                auth_revision: 3,
                proposer: 0x8e9e_05c5_2164_694d,
                proposed_at_unix_ms: 1_790_000_000_000,
            }),
            request: Some(internal_raft_request::Request::Put(PutRequest {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                ..Default::default()
            })),
        };
        let bytes = req.encode_to_vec();
        let decoded = InternalRaftRequest::decode(bytes.as_slice());
        assert_eq!(decoded.ok(), Some(req));
    }

    #[test]
    fn encoded_watch_response_is_a_watch_response_on_the_wire() {
        use super::etcdserverpb::{ResponseHeader, WatchResponse};
        use super::mvccpb::{event::EventType, Event};
        use super::wire::EncodedWatchResponse;
        let ev = |k: &[u8], t: EventType, prev: bool| Event {
            r#type: t as i32,
            kv: Some(KeyValue {
                key: k.to_vec(),
                value: b"v".repeat(300).into(),
                create_revision: 2,
                mod_revision: 9,
                version: 3,
                lease: 7,
            }),
            prev_kv: prev.then(|| KeyValue {
                key: k.to_vec(),
                mod_revision: 8,
                ..Default::default()
            }),
        };
        let plain = WatchResponse {
            header: Some(ResponseHeader {
                cluster_id: 1,
                member_id: 2,
                revision: 9,
                raft_term: 4,
            }),
            watch_id: 5,
            created: true,
            canceled: true,
            compact_revision: 3,
            cancel_reason: "why".into(),
            fragment: true,
            events: vec![
                ev(b"a", EventType::Put, false),
                ev(b"b", EventType::Delete, true),
            ],
        };
        let encoded = EncodedWatchResponse::from(plain.clone());
        assert_eq!(encoded.encode_to_vec(), plain.encode_to_vec());
        assert_eq!(encoded.encoded_len(), plain.encoded_len());
        let back = WatchResponse::decode(encoded.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(back, plain);

        // The same events, the last one held as shared events: the same bytes again.
        #[derive(Debug)]
        struct Held(Vec<Vec<u8>>);
        impl super::wire::EncodedEvents for Held {
            fn for_each_run(&self, f: &mut dyn FnMut(&[u8])) {
                self.0.iter().for_each(|run| f(run));
            }
        }
        let framed = |events: &[Event]| {
            let mut run = Vec::new();
            for e in events {
                let ev = e.encode_to_vec();
                let before = run.len();
                super::wire::put_event_field(&mut run, &ev);
                assert_eq!(run.len() - before, super::wire::event_field_len(&ev));
            }
            run
        };
        let mut split = encoded.clone();
        split.events.pop().expect("two events");
        split.shared_events = Some(std::sync::Arc::new(Held(vec![framed(&plain.events[1..])])));
        assert_eq!(split.encode_to_vec(), plain.encode_to_vec());
        assert_eq!(split.encoded_len(), plain.encoded_len());
        // Both events in one run, then an empty run and one more run of both.
        let mut all_shared = EncodedWatchResponse::from(WatchResponse::default());
        all_shared.shared_events = Some(std::sync::Arc::new(Held(vec![
            framed(&plain.events),
            Vec::new(),
            framed(&plain.events),
        ])));
        let back = WatchResponse::decode(all_shared.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(
            back.events,
            [plain.events.clone(), plain.events.clone()].concat()
        );
        assert_eq!(all_shared.encoded_len(), all_shared.encode_to_vec().len());
    }

    #[test]
    fn encoded_range_response_is_a_range_response_on_the_wire() {
        use super::etcdserverpb::{RangeResponse, ResponseHeader};
        use super::wire::EncodedRangeResponse;

        let kv = |k: &str, rev: i64| KeyValue {
            key: k.as_bytes().to_vec(),
            value: vec![b'v'; 200].into(),
            create_revision: 2,
            mod_revision: rev,
            version: rev - 1,
            lease: 7,
        };
        for plain in [
            RangeResponse {
                header: Some(ResponseHeader {
                    cluster_id: 1,
                    member_id: 2,
                    revision: 9,
                    raft_term: 3,
                }),
                kvs: vec![kv("a", 3), kv("b", 9)],
                more: true,
                count: 5,
            },
            RangeResponse::default(),
        ] {
            let encoded = EncodedRangeResponse::from(plain.clone());
            assert_eq!(encoded.encode_to_vec(), plain.encode_to_vec());
            assert_eq!(encoded.encoded_len(), plain.encoded_len());
            let back = RangeResponse::decode(encoded.encode_to_vec().as_slice()).expect("decodes");
            assert_eq!(back, plain);
            let again =
                EncodedRangeResponse::decode(plain.encode_to_vec().as_slice()).expect("decodes");
            assert_eq!(again, encoded);
        }
    }
}
