//! Shared by the tests that run the `fetcd` binary as a child process.
#![allow(clippy::unwrap_used, dead_code)]

use std::net::TcpListener;
use std::time::Duration;
use std::time::Instant;

use etcd_client::Client;

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Connects to a fetcd starting on `port`, once it answers a read (bounded wait).
pub async fn connect_when_serving(port: u16) -> Client {
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut c) = Client::connect([url.as_str()], None).await {
            if c.get("probe", None).await.is_ok() {
                return c;
            }
        }
        assert!(Instant::now() < deadline, "fetcd did not come up on {url}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
