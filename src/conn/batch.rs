//! How large one pipelined batch may grow: the one policy for a [`Client`](crate::Client)'s
//! multi-key calls and a [`SharedClient`](crate::SharedClient)'s rounds, so that the two
//! cannot drift apart.

/// Over TLS, the most request bytes sent in one go: one TLS record's worth of plaintext.
/// memcached 1.6 (with OpenSSL) stalls on a longer pipelined request of replied commands: it
/// answers the commands of the first record, and the next records wait in OpenSSL's buffer
/// while memcached waits on the socket (reproduced with Python's `ssl` client too).
pub(crate) const TLS_BATCH_BYTES: usize = 16 * 1024;

/// The most distinct keys in one coalesced multi-get of a round: a huge batch would hold
/// every other caller behind it.
pub(crate) const MAX_ROUND_KEYS: usize = 256;

/// The most request bytes (keys and values) in one store or delete batch of a round; a
/// larger value goes alone.
pub(crate) const MAX_ROUND_BYTES: usize = 256 * 1024;

/// A command's fixed part, estimated: verb, flags, TTL, length and line ends (the key and
/// the value are counted apart).
pub(crate) const REQUEST_OVERHEAD: usize = 48;

/// A cap on a batch's request bytes, and how an item's bytes are estimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BatchPolicy {
    /// The most request bytes in one batch (a single larger item still goes, alone).
    pub(crate) max_bytes: usize,
    /// Bytes a request adds besides its key and value: [`REQUEST_OVERHEAD`] and the
    /// namespace prefixed to every key.
    overhead: usize,
}

impl BatchPolicy {
    /// A client's multi-key stores and deletes: sent whole, except over TLS (one record per
    /// chunk, each answered before the next is sent).
    pub(crate) fn multi_key(tls: bool, namespace_len: usize) -> Option<BatchPolicy> {
        tls.then(|| BatchPolicy::with_cap(TLS_BATCH_BYTES, namespace_len))
    }

    /// A shared client's round: store and delete batches of at most [`MAX_ROUND_BYTES`], or
    /// one TLS record's worth over TLS.
    pub(crate) fn round(tls: bool, namespace_len: usize) -> BatchPolicy {
        let cap = if tls {
            TLS_BATCH_BYTES
        } else {
            MAX_ROUND_BYTES
        };
        BatchPolicy::with_cap(cap, namespace_len)
    }

    fn with_cap(max_bytes: usize, namespace_len: usize) -> BatchPolicy {
        BatchPolicy {
            max_bytes,
            overhead: REQUEST_OVERHEAD + namespace_len,
        }
    }

    /// The estimated request bytes of one item.
    #[inline]
    pub(crate) fn item_bytes(&self, key_len: usize, value_len: usize) -> usize {
        key_len + value_len + self.overhead
    }

    /// Whether a batch of `items` items and `bytes` bytes has no room for one more of
    /// `next` bytes. An empty batch always takes the next item, however large.
    #[inline]
    pub(crate) fn is_full(&self, items: usize, bytes: usize, next: usize) -> bool {
        items > 0 && bytes + next > self.max_bytes
    }

    /// The length of the first chunk of `n` items (`key_value_len(j)`: item `j`'s key and
    /// value bytes) if they do not fit in one batch; `None` when they do.
    pub(crate) fn first_chunk(
        &self,
        n: usize,
        key_value_len: impl Fn(usize) -> usize,
    ) -> Option<usize> {
        let mut bytes = 0;
        for j in 0..n {
            let next = key_value_len(j) + self.overhead;
            if self.is_full(j, bytes, next) {
                return Some(j);
            }
            bytes += next;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_item_goes_alone_and_small_ones_fill_a_record() {
        let p = BatchPolicy::multi_key(true, 0).expect("capped over TLS");
        assert_eq!(p.first_chunk(3, |_| 20_000), Some(1));
        assert_eq!(p.first_chunk(1, |_| 20_000), None);
        let per = 100 + REQUEST_OVERHEAD;
        assert_eq!(p.first_chunk(1000, |_| 100), Some(TLS_BATCH_BYTES / per));
        assert_eq!(BatchPolicy::multi_key(false, 0), None);
    }

    #[test]
    fn the_namespace_counts_per_item() {
        let p = BatchPolicy::round(false, 10);
        assert_eq!(p.item_bytes(5, 7), 5 + 7 + REQUEST_OVERHEAD + 10);
        assert!(!p.is_full(0, 0, MAX_ROUND_BYTES * 2));
        assert!(p.is_full(1, MAX_ROUND_BYTES - 1, 2));
    }
}
