//! The cache's recent server lists, kept in the master, for storages that follow a changing
//! list (`follow_list`): a storage started after some changes learns from them where the
//! keys were, so that its writes delete them there too (see "Live server lists" in the
//! module documentation).
//!
//! Each storage records the list it starts with and each list it takes, as one resource of
//! the collection [`COLLECTION`] in the master (through the `Storage` API: every master
//! keeps it), named `{wall-clock ms, 13 digits}-{hash of the list}`, with the servers one
//! per line. Records older than what the cache can still hold (its TTL, and the change
//! windows) are removed by the storages that record.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::storage::{Result, Storage, StorageError};

/// The master's collection of recorded lists.
pub(super) const COLLECTION: &str = "mcstore-server-lists";

/// How far back the lists matter when the cache's entries never expire (TTL 0).
const NO_TTL_HORIZON: Duration = Duration::from_secs(24 * 3600);

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// How far back lists matter: an entry written under an older list has expired (`ttl`
/// seconds, 0: none, then a day), with the windows of a change (`skew`) on top.
pub(super) fn horizon(ttl: u32, skew: Duration) -> Duration {
    let ttl = match ttl {
        0 => NO_TTL_HORIZON,
        t => Duration::from_secs(u64::from(t)),
    };
    ttl + 2 * skew
}

/// FNV-1a over the servers, in order: two records of one list share it.
fn list_hash(servers: &[String]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for s in servers {
        for &b in s.as_bytes().iter().chain(b"\n") {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Records `servers` (as configured: `host:port[:weight]`) as the list at `at_ms`, and
/// removes the records older than `since_ms`.
pub(super) fn record(
    master: &dyn Storage,
    servers: &[String],
    at_ms: u64,
    since_ms: u64,
) -> Result<()> {
    master.create_container(COLLECTION)?;
    let name = format!("{at_ms:013}-{:016x}", list_hash(servers));
    let info = master.info(COLLECTION, Some(&name))?;
    master.put_content(&info, servers.join("\n").as_str().into())?;
    for (old, info) in master.ls(COLLECTION, None)? {
        if parse_at(&old).is_some_and(|at| at < since_ms) {
            match master.remove_content(&info) {
                Ok(()) | Err(StorageError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// The time a record's name gives.
fn parse_at(name: &str) -> Option<u64> {
    name.split_once('-')?.0.parse().ok()
}

/// The lists recorded at or after `since_ms`, oldest first, each once in a row (records of
/// one list by several storages collapse into the first), with the time of that record.
pub(super) fn load(master: &dyn Storage, since_ms: u64) -> Result<Vec<(u64, Vec<String>)>> {
    let names = match master.ls(COLLECTION, None) {
        Ok(n) => n,
        Err(StorageError::NotFound(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut records: Vec<(u64, Vec<String>)> = Vec::new();
    for (name, info) in names {
        let Some(at) = parse_at(&name).filter(|&at| at >= since_ms) else {
            continue;
        };
        let content = match master.get_content(&info) {
            Ok(c) => c,
            // Pruned by another storage meanwhile.
            Err(StorageError::NotFound(_)) => continue,
            Err(e) => return Err(e),
        };
        let servers: Vec<String> = String::from_utf8_lossy(&content)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        if !servers.is_empty() {
            records.push((at, servers));
        }
    }
    records.sort_by_key(|r| r.0);
    let mut lists: Vec<(u64, Vec<String>)> = Vec::new();
    for (at, servers) in records {
        if lists.last().map(|l| &l.1) != Some(&servers) {
            lists.push((at, servers));
        }
    }
    Ok(lists)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;

    fn list(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn records_come_back_in_order_once_in_a_row_and_old_ones_go() {
        let m = MemoryStorage::new();
        assert!(load(&m, 0).unwrap().is_empty());
        let load = |m: &MemoryStorage, since| -> Vec<Vec<String>> {
            load(m, since)
                .unwrap()
                .into_iter()
                .map(|(_, l)| l)
                .collect()
        };
        let (a, b) = (list(&["h:1", "h:2"]), list(&["h:1", "h:2", "h:3:2"]));
        record(&m, &a, 1_000, 0).unwrap();
        record(&m, &a, 1_001, 0).unwrap(); // another storage, the same list
        record(&m, &b, 2_000, 0).unwrap();
        record(&m, &a, 3_000, 0).unwrap();
        assert_eq!(load(&m, 0), [a.clone(), b.clone(), a.clone()]);
        assert_eq!(load(&m, 1_500), [b.clone(), a.clone()]);
        assert_eq!(super::load(&m, 0).unwrap()[1].0, 2_000);
        // Recording prunes what is older than its horizon.
        record(&m, &b, 4_000, 2_500).unwrap();
        assert_eq!(m.ls(COLLECTION, None).unwrap().len(), 2);
        assert_eq!(load(&m, 0), [a, b]);
    }
}
