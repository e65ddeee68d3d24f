//! `fetcd-floor`: the least an etcd-compatible server can do for a put on this machine, so that
//! put-1's fetcd/etcd ratio can be read against what the machine allows. It answers over the
//! gRPC stack fetcd uses (tonic), after making each put durable with one write as fetcd's log
//! does, and nothing else: no Raft, no MVCC, no index. Run it in fetcd's place and the ratios
//! read floor/etcd:
//!
//! ```sh
//! fetcd-bench --compare --only put-1,put-1-paced --load-keys 0 --fetcd-bin target/release/fetcd-floor
//! ```
//!
//! It is not a store. Put writes its key and value into the next whole 4 KiB pages of a
//! preallocated, zero-filled file opened `O_DIRECT | O_DSYNC` (on a disk with a volatile cache:
//! the write, then a cache flush) and answers with the next revision; `prev_kv` is not kept.
//! Range answers an empty result (the harness's readiness probe); every other call is
//! Unimplemented. Puts are written one at a time, without group commit: a floor for one client.
//! It takes etcd's flags and uses `--data-dir` and the first of `--listen-client-urls`.

use std::fs::File;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;
use std::sync::atomic::AtomicI64;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use anyhow::Context as _;
use fetcd_proto::etcdserverpb::CompactionRequest;
use fetcd_proto::etcdserverpb::CompactionResponse;
use fetcd_proto::etcdserverpb::DeleteRangeRequest;
use fetcd_proto::etcdserverpb::DeleteRangeResponse;
use fetcd_proto::etcdserverpb::PutRequest;
use fetcd_proto::etcdserverpb::PutResponse;
use fetcd_proto::etcdserverpb::RangeRequest;
use fetcd_proto::etcdserverpb::ResponseHeader;
use fetcd_proto::etcdserverpb::TxnRequest;
use fetcd_proto::etcdserverpb::TxnResponse;
use fetcd_proto::wire::kv_server::KVServer;
use fetcd_proto::wire::kv_server::KV;
use fetcd_proto::wire::EncodedRangeResponse;
use tonic::Request;
use tonic::Response;
use tonic::Status;

/// What every call but Put and Range answers.
const ONLY_PUT_AND_RANGE: &str = "fetcd-floor answers Put and Range only";

/// The page `O_DIRECT` writes whole, as fetcd's log does.
const PAGE: usize = 4096;
/// The log file's size; puts wrap around to its start.
const LOG_BYTES: u64 = 64 << 20;

/// Where puts go: the file, the next offset and a page-aligned buffer.
struct Log {
    file: File,
    /// Whether `file` syncs its own writes (`O_DSYNC`); if not, each write is followed by
    /// `fdatasync` (a file system that refuses `O_DIRECT`, such as tmpfs).
    direct: bool,
    next: u64,
    buf: Vec<u8>,
}

impl Log {
    /// Writes `parts` into the next whole pages and makes them durable.
    fn append(&mut self, parts: &[&[u8]]) -> std::io::Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let pages = len.div_ceil(PAGE).max(1);
        let size = pages * PAGE;
        if self.buf.len() < size + PAGE {
            self.buf.resize(size + PAGE, 0);
        }
        // O_DIRECT needs a page-aligned buffer: use the aligned stretch of an oversized one.
        let skew = self.buf.as_ptr() as usize % PAGE;
        let start = (PAGE - skew) % PAGE;
        let page = &mut self.buf[start..start + size];
        let mut at = 0;
        for p in parts {
            page[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        page[at..].fill(0);
        if self.next + size as u64 > LOG_BYTES {
            self.next = 0;
        }
        self.file.write_all_at(page, self.next)?;
        if !self.direct {
            self.file.sync_data()?;
        }
        self.next += size as u64;
        Ok(())
    }
}

/// The KV service: durable puts, empty ranges.
struct Floor {
    log: Mutex<Log>,
    revision: AtomicI64,
}

/// The response header of a single-member cluster at `revision`.
fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        cluster_id: 1,
        member_id: 1,
        revision,
        raft_term: 1,
    })
}

#[tonic::async_trait]
impl KV for Floor {
    async fn range(
        &self,
        _req: Request<RangeRequest>,
    ) -> Result<Response<EncodedRangeResponse>, Status> {
        Ok(Response::new(EncodedRangeResponse {
            header: header(self.revision.load(Ordering::SeqCst)),
            ..Default::default()
        }))
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let r = req.into_inner();
        let revision = {
            let mut log = self
                .log
                .lock()
                .map_err(|_| Status::internal("a write panicked"))?;
            log.append(&[&r.key, &r.value])
                .map_err(|e| Status::internal(format!("write: {e}")))?;
            // Under the lock: revisions in the order the writes were made durable.
            self.revision.fetch_add(1, Ordering::SeqCst) + 1
        };
        Ok(Response::new(PutResponse {
            header: header(revision),
            prev_kv: None,
        }))
    }

    async fn delete_range(
        &self,
        _req: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        Err(Status::unimplemented(ONLY_PUT_AND_RANGE))
    }

    async fn txn(&self, _req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        Err(Status::unimplemented(ONLY_PUT_AND_RANGE))
    }

    async fn compact(
        &self,
        _req: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        Err(Status::unimplemented(ONLY_PUT_AND_RANGE))
    }
}

/// `--data-dir` and the first `--listen-client-urls` address; etcd's other flags are ignored.
struct Flags {
    data_dir: PathBuf,
    listen: std::net::SocketAddr,
}

fn parse_flags(args: &[String]) -> anyhow::Result<Flags> {
    let mut data_dir = PathBuf::from("default.floor");
    let mut listen = "127.0.0.1:2379".to_owned();
    let mut i = 0;
    while i < args.len() {
        let (name, inline) = match args[i].split_once('=') {
            Some((n, v)) => (n, Some(v.to_owned())),
            None => (args[i].as_str(), None),
        };
        let value = match inline {
            Some(v) => Some(v),
            None if args.get(i + 1).is_some_and(|v| !v.starts_with("--")) => {
                i += 1;
                args.get(i).cloned()
            }
            None => None,
        };
        match (name, value) {
            ("--data-dir", Some(v)) => data_dir = v.into(),
            ("--listen-client-urls", Some(v)) => {
                let first = v.split(',').next().unwrap_or_default();
                listen = first.trim_start_matches("http://").to_owned();
            }
            ("--data-dir" | "--listen-client-urls", None) => {
                anyhow::bail!("{name} needs a value")
            }
            _ => {}
        }
        i += 1;
    }
    Ok(Flags {
        data_dir,
        listen: listen
            .parse()
            .with_context(|| format!("--listen-client-urls: {listen:?} is not host:port"))?,
    })
}

/// Creates the zero-filled log in `dir` and opens it for durable writes.
fn open_log(dir: &std::path::Path) -> anyhow::Result<Log> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join("floor.log");
    let mut f = File::create(&path).with_context(|| format!("create {}", path.display()))?;
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..LOG_BYTES / (1 << 20) {
        f.write_all(&zeros)?;
    }
    f.sync_all()?;
    let direct = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
        .open(&path);
    let (file, direct) = match direct {
        Ok(file) => (file, true),
        Err(_) => (OpenOptions::new().write(true).open(&path)?, false),
    };
    Ok(Log {
        file,
        direct,
        next: 0,
        buf: Vec::new(),
    })
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--version") {
        println!("fetcd-floor {}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    let flags = parse_flags(&args)?;
    let floor = Floor {
        log: Mutex::new(open_log(&flags.data_dir)?),
        revision: AtomicI64::new(1),
    };
    // One worker, as fetcd runs on two cores.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("start the runtime")?
        .block_on(async move {
            tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .add_service(KVServer::new(floor))
                .serve(flags.listen)
                .await
                .context("serve")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_etcds_flags_and_keeps_two() -> anyhow::Result<()> {
        let args: Vec<String> = [
            "--name",
            "m1",
            "--data-dir",
            "/tmp/d",
            "--listen-client-urls=http://127.0.0.1:23790,http://127.0.0.1:23791",
            "--initial-cluster-state",
            "new",
            "--some-switch",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let f = parse_flags(&args)?;
        assert_eq!(f.data_dir, PathBuf::from("/tmp/d"));
        assert_eq!(f.listen.to_string(), "127.0.0.1:23790");
        assert!(parse_flags(&["--data-dir".to_owned()]).is_err());
        Ok(())
    }

    #[test]
    fn a_put_lands_in_whole_pages_and_the_log_wraps() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut log = open_log(dir.path())?;
        log.append(&[b"key", b"value"])?;
        assert_eq!(log.next, PAGE as u64);
        log.append(&[&[7u8; PAGE], b"x"])?;
        assert_eq!(log.next, 3 * PAGE as u64);
        let bytes = std::fs::read(dir.path().join("floor.log"))?;
        assert_eq!(&bytes[..8], b"keyvalue");
        assert!(bytes[8..PAGE].iter().all(|&b| b == 0));
        assert!(bytes[PAGE..2 * PAGE].iter().all(|&b| b == 7));
        assert_eq!(bytes[2 * PAGE], b'x');
        log.next = LOG_BYTES - 1;
        log.append(&[b"again"])?;
        assert_eq!(log.next, PAGE as u64, "a write past the end starts over");
        Ok(())
    }
}
