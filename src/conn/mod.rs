//! The connection layer: the `mio` driver that owns the sockets.
//!
//! The driver knows bytes, sockets and deadlines, not what a command means: the client hands it
//! an encoded request and a closure that parses replies, and the driver moves bytes both ways
//! until the closure says the reply is complete.

pub(crate) mod batch;
mod buf;
pub(crate) mod driver;
mod exchange;
#[cfg(feature = "tls")]
pub(crate) mod tls;

/// The connection's request/reply machine and read buffer, for the `conn_stream` fuzz body.
#[cfg(any(test, fuzzing))]
pub(crate) mod exchange_for_fuzzing {
    pub(crate) use super::buf::ReadBuf;
    pub(crate) use super::exchange::{Exchange, Failure};
}

pub(crate) use crate::addr::ServerAddr;
