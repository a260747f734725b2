//! What the values attack tests share: values that say which version they are.
#![allow(dead_code)]

/// A value that says which version it is, and whose every byte can be checked.
pub fn versioned(version: u64, len: usize) -> Vec<u8> {
    let mut v = version.to_le_bytes().to_vec();
    let mut x = version.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push(x as u8);
    }
    v
}

/// The version of a value made by [`versioned`]; panics if it is a mix of versions.
pub fn version_of(v: &[u8], len: usize) -> u64 {
    assert!(v.len() >= 8, "a value of {} bytes", v.len());
    let version = u64::from_le_bytes(v[..8].try_into().unwrap());
    assert!(
        v == versioned(version, len).as_slice(),
        "a damaged or mixed value (claims version {version}, {} bytes)",
        v.len()
    );
    version
}
