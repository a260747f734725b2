//! serde codecs: postcard (compact binary) and JSON.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{describe, flags, Codec};
use crate::error::{Error, Result};

/// serde with postcard: compact (varints, no field names), a stable documented wire format.
/// Flagged [`flags::POSTCARD`]; a value in another format is refused, never misread.
///
/// Postcard does not describe itself: readers must use the same type (or a compatible
/// one: fields appended at the end need `#[serde(default)]` and are not supported by
/// postcard, so change a type by giving it a new key or a version field).
#[derive(Debug, Clone, Copy, Default)]
pub struct Postcard;

impl<T: Serialize + DeserializeOwned> Codec<T> for Postcard {
    fn encode(&self, value: &T, out: &mut Vec<u8>) -> Result<u32> {
        let buf = std::mem::take(out);
        *out = postcard::to_extend(value, buf)
            .map_err(|e| Error::Codec(format!("postcard encode: {e}")))?;
        Ok(flags::POSTCARD)
    }

    fn decode(&self, bytes: &[u8], f: u32) -> Result<T> {
        expect_format(f, flags::POSTCARD, "postcard")?;
        match postcard::take_from_bytes(bytes) {
            Ok((v, [])) => Ok(v),
            Ok((_, rest)) => Err(Error::Codec(format!(
                "postcard value followed by {} stray bytes",
                rest.len()
            ))),
            Err(e) => Err(Error::Codec(format!("postcard decode: {e}"))),
        }
    }
}

/// serde with JSON: readable by anything, larger and slower than [`Postcard`]. Flagged
/// [`flags::JSON`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

impl<T: Serialize + DeserializeOwned> Codec<T> for Json {
    fn encode(&self, value: &T, out: &mut Vec<u8>) -> Result<u32> {
        serde_json::to_writer(&mut *out, value)
            .map_err(|e| Error::Codec(format!("JSON encode: {e}")))?;
        Ok(flags::JSON)
    }

    fn decode(&self, bytes: &[u8], f: u32) -> Result<T> {
        expect_format(f, flags::JSON, "JSON")?;
        serde_json::from_slice(bytes).map_err(|e| Error::Codec(format!("JSON decode: {e}")))
    }
}

/// Refuses a value whose flags are not exactly `format` (uncompressed, not chunked).
fn expect_format(f: u32, format: u32, name: &str) -> Result<()> {
    let foreign = f & (flags::ANY_COMPRESSION | flags::PICKLE | flags::CHUNKED);
    if foreign == 0 && f & flags::FORMAT_MASK == format {
        return Ok(());
    }
    let what = if foreign != 0 {
        describe(foreign)
    } else if f & flags::FORMAT_MASK == 0 {
        "not serialized"
    } else {
        describe(f & flags::FORMAT_MASK)
    };
    Err(Error::Codec(format!(
        "flags {f:#x} say the value is {what}, not {name}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Doc {
        id: u64,
        title: String,
        tags: Vec<String>,
        attrs: BTreeMap<String, i64>,
        parent: Option<Box<Doc>>,
    }

    fn doc() -> Doc {
        Doc {
            id: 7,
            title: "ünïcode".into(),
            tags: vec!["a".into(), "b".into()],
            attrs: [("x".to_string(), -3)].into_iter().collect(),
            parent: Some(Box::new(Doc {
                id: 1,
                title: String::new(),
                tags: vec![],
                attrs: BTreeMap::new(),
                parent: None,
            })),
        }
    }

    #[test]
    fn both_formats_round_trip_and_refuse_each_other() {
        let mut p = Vec::new();
        let pf = Postcard.encode(&doc(), &mut p).unwrap();
        let mut j = Vec::new();
        let jf = Json.encode(&doc(), &mut j).unwrap();
        assert!(p.len() < j.len());
        assert_eq!(Codec::<Doc>::decode(&Postcard, &p, pf).unwrap(), doc());
        assert_eq!(Codec::<Doc>::decode(&Json, &j, jf).unwrap(), doc());
        assert!(Codec::<Doc>::decode(&Postcard, &j, jf).is_err());
        assert!(Codec::<Doc>::decode(&Json, &p, pf).is_err());
        assert!(Codec::<Doc>::decode(&Postcard, &p, 0).is_err());
        assert!(Codec::<Doc>::decode(&Postcard, &p, pf | flags::LZ4).is_err());
        // Truncated and trailing bytes.
        for cut in 0..p.len() {
            assert!(Codec::<Doc>::decode(&Postcard, &p[..cut], pf).is_err());
        }
        let mut longer = p.clone();
        longer.push(0);
        assert!(Codec::<Doc>::decode(&Postcard, &longer, pf).is_err());
        // A huge claimed length does not allocate it.
        let huge = [0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(Codec::<Vec<u64>>::decode(&Postcard, &huge, pf).is_err());
    }
}
