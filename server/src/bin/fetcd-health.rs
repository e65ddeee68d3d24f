//! `fetcd-health`: a container healthcheck that needs no shell and no curl.
//!
//! It performs one linearizable etcd Range (of a key nobody writes) through the project's own
//! gRPC client against a member's client URL and exits 0 only if the member answered within the
//! timeout. A linearizable read needs a leader and a quorum's read index, so success means the
//! member is part of a working cluster — what etcd's `GET /health` reports.
//!
//! ```text
//! fetcd-health [--endpoint URL] [--timeout SECONDS]
//! ```
//!
//! The endpoint defaults to `$FETCD_HEALTH_ENDPOINT`, else the first of
//! `$ETCD_ADVERTISE_CLIENT_URLS`, else `http://127.0.0.1:2379`; the timeout defaults to 3 seconds.
//! Exit codes: 0 healthy, 1 unhealthy (message on stderr), 2 bad arguments.

use std::process::ExitCode;
use std::time::Duration;

use fetcd_proto::etcdserverpb::kv_client::KvClient;
use fetcd_proto::etcdserverpb::RangeRequest;
use tonic::transport::Endpoint;

/// The key read; its value (almost always absent) does not matter, only that the read succeeds.
const PROBE_KEY: &[u8] = b"health";

const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:2379";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);
const USAGE: &str = "usage: fetcd-health [--endpoint URL] [--timeout SECONDS]";

struct Args {
    endpoint: String,
    timeout: Duration,
}

fn default_endpoint() -> String {
    if let Ok(e) = std::env::var("FETCD_HEALTH_ENDPOINT") {
        if !e.is_empty() {
            return e;
        }
    }
    std::env::var("ETCD_ADVERTISE_CLIENT_URLS")
        .ok()
        .and_then(|urls| {
            urls.split(',')
                .map(str::trim)
                .find(|u| !u.is_empty())
                .map(str::to_string)
        })
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        endpoint: default_endpoint(),
        timeout: DEFAULT_TIMEOUT,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (a.clone(), None),
        };
        let mut value = || inline.clone().or_else(|| it.next());
        match flag.as_str() {
            "--endpoint" | "--endpoints" => {
                args.endpoint = value().ok_or("--endpoint needs a URL")?;
            }
            "--timeout" => {
                let v = value().ok_or("--timeout needs a number of seconds")?;
                let secs: f64 = v
                    .trim_end_matches('s')
                    .parse()
                    .map_err(|_| format!("--timeout {v}: not a number of seconds"))?;
                if !(secs > 0.0 && secs.is_finite()) {
                    return Err(format!("--timeout {v}: must be positive"));
                }
                args.timeout = Duration::from_secs_f64(secs);
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

async fn probe(endpoint: &str, timeout: Duration) -> Result<i64, String> {
    let ep = Endpoint::from_shared(endpoint.to_string())
        .map_err(|e| format!("bad endpoint {endpoint}: {e}"))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let channel = ep
        .connect()
        .await
        .map_err(|e| format!("connect {endpoint}: {e}"))?;
    let mut kv = KvClient::new(channel);
    let resp = kv
        .range(RangeRequest {
            key: PROBE_KEY.to_vec(),
            serializable: false,
            count_only: true,
            ..Default::default()
        })
        .await
        .map_err(|s| format!("range on {endpoint}: {}: {}", s.code(), s.message()))?;
    Ok(resp.into_inner().header.map_or(0, |h| h.revision))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("fetcd-health: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fetcd-health: start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = rt.block_on(async {
        tokio::time::timeout(args.timeout, probe(&args.endpoint, args.timeout))
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "{}: no answer within {:?}",
                    args.endpoint, args.timeout
                ))
            })
    });
    match outcome {
        Ok(revision) => {
            println!("{} is healthy (revision {revision})", args.endpoint);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fetcd-health: {e}");
            ExitCode::FAILURE
        }
    }
}
