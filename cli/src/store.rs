//! `mcstore store`: resources through the cache, in front of a file storage (or PostgreSQL).

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::Duration;

use mcstore::storage::{Content, FsStorage, MemcacheStorage, Storage};

use crate::args::{Compress, Global, StoreOp};
use crate::{builder, Quiet, Res};

/// Whether `--master` names a PostgreSQL database.
pub(crate) fn is_pg_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// How `store` caches values: `--compress`, `--chunked`.
#[derive(Default)]
pub(crate) struct Values {
    pub(crate) compress: Option<Compress>,
    pub(crate) chunked_mib: Option<usize>,
}

/// The storage behind `store`: the cache (short timeouts: a dead cache must not slow the CLI
/// much) in front of a file storage at `root`, or the PostgreSQL master `--master` names.
pub(crate) fn open_store(
    g: &Global,
    root: &std::path::Path,
    master: Option<&str>,
    values: &Values,
) -> Res<MemcacheStorage> {
    let master: Arc<dyn Storage> = match master {
        None => Arc::new(FsStorage::open(root)?),
        Some(url) if is_pg_url(url) => Arc::new(mcstore::storage::PgStorage::builder(url).open()?),
        Some(other) => return Err(format!("--master {other:?}: expected a postgres:// URL").into()),
    };
    let b = builder(g, "127.0.0.1:11211")?
        .io_timeout(Duration::from_millis(g.timeout_ms.min(200)))
        .connect_timeout(Duration::from_millis(g.timeout_ms.min(200)));
    let mut s = MemcacheStorage::builder(b.build()?, master);
    if let Some(algo) = values.compress {
        s = s.compression(algo.compressor().min_size(1024));
    }
    if let Some(mib) = values.chunked_mib {
        s = s.chunked_values(mib.saturating_mul(1 << 20));
    }
    Ok(s.build())
}

pub(crate) fn store_op(
    g: &Global,
    root: &std::path::Path,
    master: Option<&str>,
    values: &Values,
    op: StoreOp,
    out: &mut impl Write,
) -> Res<()> {
    // Only a write creates the folder storage: a read of a storage that is not there says so.
    if master.is_none() && !matches!(op, StoreOp::Put { .. }) && !root.exists() {
        return Err(format!(
            "no storage at {} (nothing stored there yet: `store put` creates it; or give --root)",
            root.display()
        )
        .into());
    }
    let s = open_store(g, root, master, values)?;
    match op {
        StoreOp::Put {
            collection,
            name,
            file,
            meta,
        } => {
            let info = s.info(&collection, Some(&name))?;
            s.create_container(&collection)?;
            let mut input: Box<dyn Read + Send> = match file {
                Some(p) if p.as_os_str() != "-" => {
                    Box::new(std::fs::File::open(&p).map_err(|e| format!("{}: {e}", p.display()))?)
                }
                _ => Box::new(io::stdin()),
            };
            let content = Content::Reader(&mut input);
            if meta {
                s.put_meta_data(&info, content)?;
            } else {
                s.put_content(&info, content)?;
            }
        }
        StoreOp::Get {
            collection,
            name,
            meta,
        } => {
            let info = s.info(&collection, Some(&name))?;
            let data = if meta {
                s.get_meta_data(&info)?
            } else {
                s.get_content(&info)?
            };
            out.write_all(&data)?;
        }
        StoreOp::Ls { collection, ext } => {
            for (name, _) in s.ls(&collection, ext.as_deref())? {
                writeln!(out, "{name}")?;
            }
        }
        StoreOp::Rm {
            collection,
            name,
            meta,
        } => {
            let info = s.info(&collection, Some(&name))?;
            if meta {
                s.remove_meta_data(&info)?;
            } else {
                s.remove_content(&info)?;
            }
        }
        StoreOp::Exists { collection, name } => {
            if !s.exists(&s.info(&collection, Some(&name))?)? {
                return Err(Quiet.into());
            }
        }
        StoreOp::Info { collection, name } => {
            let info = s.info(&collection, name.as_deref())?;
            let fs = FsStorage::open(root)?.info(&collection, name.as_deref())?;
            writeln!(out, "collection\t{}", info.collection)?;
            if let Some(r) = &info.resource {
                writeln!(out, "resource\t{r}")?;
            }
            writeln!(out, "cache key\t{}", info.key)?;
            writeln!(out, "path\t{}", root.join(&fs.key).display())?;
        }
    }
    Ok(())
}
