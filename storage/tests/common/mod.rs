//! Helpers shared by the integration tests.

use std::path::Path;

use fetcd_storage::KvStore;

/// Opens the sled database at `path`. sled 0.34 can hold its file lock for a moment after the
/// last handle of a database is dropped (spacejam/sled#1234), so this retries on that error only.
pub fn open_db(path: &Path) -> sled::Db {
    let mut tries = 0;
    loop {
        match sled::Config::new().path(path).open() {
            Ok(db) => return db,
            Err(e) if tries < 1000 && e.to_string().contains("could not acquire lock") => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(e) => panic!("open {path:?}: {e}"),
        }
    }
}

/// Opens the store in the sled database at `path`.
pub fn open(path: &Path) -> KvStore {
    KvStore::open(open_db(path)).expect("open store")
}
