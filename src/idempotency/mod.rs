//! Idempotency: skip records whose work is already done, without ever skipping work that
//! failed.
//!
//! The protocol is **claim → work → complete** (never check-then-set, never mark before the
//! work):
//!
//! 1. [`IdempotencyStore::claim`] with a lease answers [`Claim::Acquired`] (run the handler),
//!    [`Claim::Done`] (a previous run succeeded: skip and settle) or [`Claim::Busy`] (another
//!    worker holds a live lease: treated as a transient failure, tried again later, never
//!    skipped).
//! 2. On success, [`IdempotencyStore::complete`] marks the key done for a TTL (6 h by default,
//!    as in the starting design).
//! 3. On failure, [`IdempotencyStore::release`] drops the claim so the retry runs. A
//!    dead-lettered record is released too, never marked done, so a redrive runs it again.
//!
//! Claims are *fenced*: each acquisition returns a fresh [`ClaimToken`], and `complete` /
//! `release` with a token whose lease expired and was re-claimed by someone else fail with
//! [`StoreError::LeaseLost`] instead of touching the new owner's claim.

pub(crate) use crate::error::StoreError;

pub(crate) mod memory;
pub(crate) mod redis;
pub(crate) mod store;

pub(crate) use self::store::{Claim, ClaimToken, IdempotencyStore};
