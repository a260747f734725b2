//! Opening a server's session: connect and, on a new connection, authenticate before its
//! first command: SASL PLAIN (binary protocol), or ASCII authentication (memcached `-Y`;
//! text and meta).

use super::Core;
use crate::conn::driver::Op;
use crate::error::{Error, Result};
use crate::proto::wire::{Binary, Cmd, Outcome, SetOutcome, StoreOpts, Text};
use crate::proto::{Key, ParseError};

/// The key of the `set` that carries ASCII credentials: memcached reads only the value.
const AUTH_KEY: &[u8] = b"mcstore-auth";

impl Core {
    /// Starts an operation on server `i`: connects if needed and, on a new connection,
    /// authenticates first when credentials are configured.
    #[inline]
    pub(super) fn start(&mut self, i: usize) -> Result<Op> {
        // A call routed before the list changed never reaches a server that left it.
        self.check_member(i)?;
        let op = self.driver.begin(i)?;
        self.health.observe.connections(i, self.driver.connects(i));
        let anonymous = self.sasl.is_none() && self.ascii_auth.is_none();
        if anonymous || self.authenticated[i] == self.driver.connects(i) {
            return Ok(op);
        }
        if self.sasl.is_some() {
            self.sasl_plain(i, &op)?;
        } else {
            self.ascii_auth(i, &op)?;
        }
        self.authenticated[i] = self.driver.connects(i);
        // A fresh deadline for the command itself.
        self.driver.begin(i)
    }

    fn sasl_plain(&mut self, i: usize, op: &Op) -> Result<()> {
        let Some((user, password)) = &self.sasl else {
            return Ok(());
        };
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
        let r = self.exchange::<Binary, _>(i, op, &auth, None, |o, _| match o {
            Outcome::Ok => Ok(Some(())),
            _ => Err(ParseError::Unexpected),
        });
        // memcached closes the connection of a client it refuses.
        r.map_err(|e| self.closed_during(i, "SASL", e))
    }

    /// memcached's ASCII authentication: `version` first, which a `-Y` server refuses until
    /// the connection authenticates (so credentials never go, as an ordinary `set`, to a
    /// server that would store them), then `set <key> 0 0 <len>` with `user password`.
    fn ascii_auth(&mut self, i: usize, op: &Op) -> Result<()> {
        let probe = self.exchange::<Text, _>(i, op, &Cmd::Version, None, |o, _| match o {
            Outcome::Version(_) => Ok(Some(())),
            _ => Err(ParseError::Unexpected),
        });
        match probe {
            // `refused` made the server's "unauthenticated" an `Auth` error: it wants us to.
            Err(Error::Auth { .. }) => {}
            Ok(()) => {
                return Err(Error::Auth {
                    server: self.labels[i].clone(),
                    message: "ASCII authentication is configured, but the server does not \
                              ask for it (it answers without it: started without -Y?); \
                              credentials not sent"
                        .into(),
                })
            }
            Err(e) => return Err(e),
        }
        let Some((user, password)) = &self.ascii_auth else {
            return Ok(());
        };
        let secret = format!("{user} {password}");
        let set = Cmd::Store(
            Key::new(AUTH_KEY).expect("a valid key"),
            StoreOpts::default(),
            secret.len(),
        );
        let r = self.exchange::<Text, _>(i, op, &set, Some(secret.as_bytes()), |o, _| match o {
            Outcome::Store(SetOutcome::Stored, ..) => Ok(Some(())),
            _ => Err(ParseError::Unexpected),
        });
        match r {
            Err(Error::Server { message, .. }) => {
                self.driver.disconnect(i);
                Err(Error::Auth {
                    server: self.labels[i].clone(),
                    message: format!("wrong user or password (the server said: {message})"),
                })
            }
            r => r.map_err(|e| self.closed_during(i, "ASCII authentication", e)),
        }
    }

    /// An I/O error while authenticating: the server closed the connection, refusing us.
    fn closed_during(&self, i: usize, what: &str, e: Error) -> Error {
        match e {
            Error::Io { source, .. } => Error::Auth {
                server: self.labels[i].clone(),
                message: format!("connection closed during {what}: {source}"),
            },
            e => e,
        }
    }
}
