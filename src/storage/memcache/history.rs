//! The cache's recent server lists, kept in the master, for storages that follow a changing
//! list (`follow_list`): a storage started after some changes learns from them where the
//! keys were, so that its writes delete them there too (see "Live server lists" in the
//! module documentation).
//!
//! Each storage records the list it starts with and each list it takes, as one resource of
//! the collection [`COLLECTION`] in the master (through the `Storage` API: every master
//! keeps it), named `{wall-clock ms, 13 digits}-{hash of the list}`, with the servers one
//! per line (`WEIGHT ADDRESS`, see [`line`]). A server that took keys in a change is flushed
//! by every storage that takes the change; each flush is recorded too ([`FLUSHES`]), so that
//! a storage started later knows which flushes are still owed (its taker's storage may have
//! stopped first). Records older than what the cache can still hold (its TTL, and the
//! change windows) are removed by the storages that record.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::storage::{Result, Storage, StorageError};

/// The master's collection of recorded lists.
pub(super) const COLLECTION: &str = "mcstore-server-lists";

/// The master's collection of recorded flushes of servers that took keys.
pub(super) const FLUSHES: &str = "mcstore-server-flushes";

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

/// A server as recorded: its weight, a space, its address as the clients name it (parsed
/// back exactly by [`parse_line`], Unix sockets too).
pub(super) fn line(addr: &str, weight: u32) -> String {
    format!("{} {addr}", weight.max(1))
}

/// A recorded server; `None` if the line is not one.
pub(super) fn parse_line(line: &str) -> Option<crate::ServerSpec> {
    let (weight, addr) = line.split_once(' ')?;
    let spec: crate::ServerSpec = addr.parse().ok()?;
    let weight: u32 = weight.parse().ok()?;
    (spec.addr.to_string() == addr).then(|| spec.weight(weight))
}

/// Records `servers` ([`line`]s) as the list at `at_ms`, and removes the records older
/// than `since_ms`.
pub(super) fn record(
    master: &dyn Storage,
    servers: &[String],
    at_ms: u64,
    since_ms: u64,
) -> Result<()> {
    put_record(
        master,
        COLLECTION,
        &format!("{at_ms:013}-{:016x}", list_hash(servers)),
        &servers.join("\n"),
        since_ms,
    )
}

/// Records that a flush of server `addr` succeeded at `at_ms` (and prunes as [`record`]).
pub(super) fn record_flush(
    master: &dyn Storage,
    addr: &str,
    at_ms: u64,
    since_ms: u64,
) -> Result<()> {
    let name = format!("{at_ms:013}-{:016x}", list_hash(&[addr.to_string()]));
    put_record(master, FLUSHES, &name, addr, since_ms)
}

/// The flushes recorded at or after `since_ms`: time and server.
pub(super) fn load_flushes(master: &dyn Storage, since_ms: u64) -> Result<Vec<(u64, String)>> {
    Ok(load_records(master, FLUSHES, since_ms)?
        .into_iter()
        .map(|(at, content)| (at, content.trim().to_string()))
        .collect())
}

fn put_record(
    master: &dyn Storage,
    collection: &str,
    name: &str,
    content: &str,
    since_ms: u64,
) -> Result<()> {
    master.create_container(collection)?;
    let info = master.info(collection, Some(name))?;
    master.put_content(&info, content.into())?;
    for (old, info) in master.ls(collection, None)? {
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
    let mut records: Vec<(u64, Vec<String>)> = load_records(master, COLLECTION, since_ms)?
        .into_iter()
        .map(|(at, content)| {
            let servers = (content.lines().map(str::trim))
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect();
            (at, servers)
        })
        .filter(|(_, s): &(u64, Vec<String>)| !s.is_empty())
        .collect();
    records.sort_by_key(|r| r.0);
    let mut lists: Vec<(u64, Vec<String>)> = Vec::new();
    for (at, servers) in records {
        if lists.last().map(|l| &l.1) != Some(&servers) {
            lists.push((at, servers));
        }
    }
    Ok(lists)
}

/// The records of `collection` at or after `since_ms`: time and content.
fn load_records(
    master: &dyn Storage,
    collection: &str,
    since_ms: u64,
) -> Result<Vec<(u64, String)>> {
    let names = match master.ls(collection, None) {
        Ok(n) => n,
        Err(StorageError::NotFound(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut records = Vec::new();
    for (name, info) in names {
        let Some(at) = parse_at(&name).filter(|&at| at >= since_ms) else {
            continue;
        };
        match master.get_content(&info) {
            Ok(c) => records.push((at, String::from_utf8_lossy(&c).into_owned())),
            // Pruned by another storage meanwhile.
            Err(StorageError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(records)
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
        // Flushes.
        record_flush(&m, "unix:/tmp/a b:2", 5_000, 0).unwrap();
        assert_eq!(
            load_flushes(&m, 0).unwrap(),
            [(5_000, "unix:/tmp/a b:2".to_string())]
        );
    }

    #[test]
    fn servers_are_read_back_exactly() {
        for (addr, w) in [
            ("10.0.0.1:11211", 1),
            ("[::1]:11211", 3),
            ("unix:/tmp/m c.sock:2", 2),
        ] {
            let spec = parse_line(&line(addr, w)).unwrap();
            assert_eq!((spec.addr.to_string().as_str(), spec.weight), (addr, w));
        }
        assert!(parse_line("10.0.0.1:11211").is_none());
        assert!(parse_line("x 10.0.0.1:11211").is_none());
    }
}
