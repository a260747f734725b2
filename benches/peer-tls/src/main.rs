//! `examples/peer_memcache.rs`, built with the `memcache` crate's TLS feature.

#[path = "../../../examples/peer_memcache.rs"]
mod peer;

fn main() {
    peer::main()
}
