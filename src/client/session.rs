//! Opening a server's session: connect and, on a new connection, authenticate (SASL PLAIN,
//! binary protocol only) before its first command.

use super::Core;
use crate::conn::driver::Op;
use crate::error::{Error, Result};
use crate::proto::wire::{Binary, Cmd, Outcome};
use crate::proto::ParseError;

impl Core {
    /// Starts an operation on server `i`: connects if needed and, on a new connection,
    /// authenticates first when SASL is configured.
    pub(super) fn start(&mut self, i: usize) -> Result<Op> {
        let op = self.driver.begin(i)?;
        self.health.observe.connections(i, self.driver.connects(i));
        let Some((user, password)) = &self.sasl else {
            return Ok(op);
        };
        if self.authenticated[i] == self.driver.connects(i) {
            return Ok(op);
        }
        let mut plain = Vec::with_capacity(user.len() + password.len() + 2);
        plain.push(0);
        plain.extend_from_slice(user.as_bytes());
        plain.push(0);
        plain.extend_from_slice(password.as_bytes());
        let auth = Cmd::Auth {
            mechanism: b"PLAIN",
            data: &plain,
        };
        // The builder allows SASL only with the binary protocol.
        let r = self.exchange::<Binary, _>(i, &op, &auth, None, |o, _| match o {
            Outcome::Ok => Ok(Some(())),
            _ => Err(ParseError::Unexpected),
        });
        match r {
            Ok(()) => {
                self.authenticated[i] = self.driver.connects(i);
                // A fresh deadline for the command itself.
                self.driver.begin(i)
            }
            // memcached closes the connection of a client it refuses.
            Err(Error::Io { source, .. }) => Err(Error::Auth {
                server: self.labels[i].clone(),
                message: format!("connection closed during SASL: {source}"),
            }),
            Err(e) => Err(e),
        }
    }
}
