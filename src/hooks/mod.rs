//! Hooks: events become durable, signed, retried webhooks. Events matching
//! a hook are rendered and written to the SQLite outbox before anything is
//! sent; a sender delivers due rows with retries; the CLI lists, replays,
//! monitors and prunes them.

pub mod outbox;
mod sender;
mod signature;
mod template;

pub use sender::Hooks;

pub use signature::Secret;
pub use template::Template;
