//! Records read in runs: each assigned partition's fetch queue is forwarded to one queue of
//! the poll thread's own, read with `rd_kafka_consume_batch_queue` (up to [`RUN`] records per
//! call), instead of one `poll` of the consumer's queue per record.
//!
//! One `poll` per record costs librdkafka two clock readings, a lock and a statistics update
//! (and rdkafka a clock reading and an allocation) for every record; a batch read costs them
//! once per run. The consumer's own queue keeps everything else — rebalances, commits,
//! errors that are not a partition's, statistics, and the records of a partition that could
//! not be forwarded — and is still polled on every turn. Rebalances never reach the split
//! queue: a batch read of the consumer's queue would unassign on one (rdkafka serves
//! rebalances as events, not through librdkafka's callback).
//!
//! A partition is forwarded as it is assigned, before librdkafka fetches it (the context's
//! `pre_rebalance`), so its records never come both ways. librdkafka keeps the forward for
//! the partition's life and drops records of an older assignment or position (a revoke, a
//! seek) when the queue is read; records already read ahead and waiting on the poll thread
//! are dropped by the poll thread itself ([`super::thread`]).
//!
//! A partition's error comes as a record with an error set, except librdkafka's own errors
//! of a partition (a topic found missing): those go to the error callback, which rdkafka
//! does not set, so librdkafka logs them; the context recognises a missing topic there.
//!
//! While the poll thread waits on the split queue, something arriving on the consumer's
//! queue wakes it (librdkafka's callback for a queue that stops being empty yields the
//! split queue's wait).
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_void};
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext};
use rdkafka::message::{BorrowedHeaders, Message};
use rdkafka::{Timestamp, TopicPartitionList};

use crate::consumer::schedule::Tp;

/// At most this many records are taken from the split queue in one call.
pub(crate) const RUN: usize = 64;

/// The poll thread's queue, which the assigned partitions' fetch queues forward to. Made
/// after the consumer and dropped before it (librdkafka's queues must not outlive their
/// client).
pub(crate) struct SplitQueue<'a> {
    /// The consumer the queues belong to, which must outlive them.
    consumer: PhantomData<&'a ()>,
    /// Where the consumer's context forwards assigned partitions: this queue until dropped.
    target: &'a SplitTarget,
    queue: NonNull<rd::rd_kafka_queue_t>,
    /// The consumer's queue, whose callback wakes a wait on `queue`.
    consumer_queue: NonNull<rd::rd_kafka_queue_t>,
    taken: Vec<*mut rd::rd_kafka_message_t>,
}

/// The address of a [`SplitQueue`]'s queue, for the consumer's context to forward newly
/// assigned partitions to (null: none).
#[derive(Debug, Default)]
pub(crate) struct SplitTarget(std::sync::atomic::AtomicPtr<rd::rd_kafka_queue_t>);

impl SplitTarget {
    /// Forwards the fetch queue of every partition of `tpl` to the split queue, if there is
    /// one. A partition librdkafka does not know keeps its records on the consumer's queue.
    pub(crate) fn split<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        tpl: &TopicPartitionList,
    ) {
        let target = self.0.load(std::sync::atomic::Ordering::Acquire);
        if target.is_null() {
            return;
        }
        let rk = consumer.client().native_ptr();
        for e in tpl.elements() {
            let Ok(topic) = CString::new(e.topic()) else {
                continue;
            };
            // SAFETY: `rk` is the live client (calling its rebalance callback); `target` is set
            // only while its `SplitQueue` lives (cleared before it is destroyed, on this same
            // poll thread); the partition's queue handle is destroyed after forwarding (the
            // forward holds its own reference to `target`).
            unsafe {
                let q = rd::rd_kafka_queue_get_partition(rk, topic.as_ptr(), e.partition());
                if !q.is_null() {
                    rd::rd_kafka_queue_forward(q, target);
                    rd::rd_kafka_queue_destroy(q);
                }
            }
        }
    }
}

impl SplitTarget {
    /// No queue anymore: partitions assigned from now on keep their records on the
    /// consumer's queue.
    fn clear(&self) {
        self.0
            .store(std::ptr::null_mut(), std::sync::atomic::Ordering::Release);
    }
}

/// librdkafka's callback for the consumer's queue: something arrived, so a wait on the split
/// queue (`opaque`) ends.
unsafe extern "C" fn wake(_rk: *mut rd::rd_kafka_t, opaque: *mut c_void) {
    // SAFETY: `opaque` is the split queue, which outlives the callback (disabled first).
    unsafe { rd::rd_kafka_queue_yield(opaque.cast()) };
}

impl<'a> SplitQueue<'a> {
    /// A split queue for `consumer`, set as `target`: where its context forwards the
    /// partitions assigned from now on. `None` when librdkafka hands out no queue (then
    /// records keep coming the usual way).
    pub(crate) fn new<C: ConsumerContext>(
        consumer: &'a BaseConsumer<C>,
        target: &'a SplitTarget,
    ) -> Option<Self> {
        let rk = consumer.client().native_ptr();
        // SAFETY: `rk` is the live client, which outlives `'a`; each handle is checked and
        // destroyed in `Drop`.
        unsafe {
            let queue = NonNull::new(rd::rd_kafka_queue_new(rk))?;
            let Some(consumer_queue) = NonNull::new(rd::rd_kafka_queue_get_consumer(rk)) else {
                rd::rd_kafka_queue_destroy(queue.as_ptr());
                return None;
            };
            rd::rd_kafka_queue_cb_event_enable(
                consumer_queue.as_ptr(),
                Some(wake),
                queue.as_ptr().cast(),
            );
            target
                .0
                .store(queue.as_ptr(), std::sync::atomic::Ordering::Release);
            Some(SplitQueue {
                consumer: PhantomData,
                target,
                queue,
                consumer_queue,
                taken: vec![std::ptr::null_mut(); RUN],
            })
        }
    }

    /// Whether the consumer's own queue holds something (a poll of it returns after one
    /// event, so more may wait).
    pub(crate) fn consumer_queue_busy(&self) -> bool {
        // SAFETY: a live handle (destroyed in `Drop`).
        unsafe { rd::rd_kafka_queue_length(self.consumer_queue.as_ptr()) > 0 }
    }

    /// Takes up to `max` (at most [`RUN`]) records into `into`, waiting at most `wait`; an
    /// error librdkafka reports for a partition comes as a record with
    /// [`NativeMessage::error`] set. librdkafka waits until it has `max` records or the time
    /// is up: a wait is for one record.
    pub(crate) fn take(
        &mut self,
        wait: Duration,
        max: usize,
        into: &mut std::collections::VecDeque<NativeMessage>,
    ) {
        let max = max.clamp(1, RUN);
        let wait_ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: a live queue; `taken` holds `RUN` slots; every message returned is owned
        // by a `NativeMessage` at once (destroyed when dropped).
        let n = unsafe {
            rd::rd_kafka_consume_batch_queue(
                self.queue.as_ptr(),
                wait_ms,
                self.taken.as_mut_ptr(),
                max,
            )
        };
        let n = usize::try_from(n).unwrap_or(0).min(max);
        into.extend(
            self.taken[..n]
                .iter()
                .filter_map(|&m| NonNull::new(m).map(NativeMessage)),
        );
    }
}

impl Drop for SplitQueue<'_> {
    fn drop(&mut self) {
        // Partitions assigned from now on keep their records on the consumer's queue.
        self.target.clear();
        // SAFETY: disabling the callback takes the consumer queue's lock, under which
        // librdkafka calls it: no call runs past this. Then both handles go (partitions
        // still forwarded hold their own references; librdkafka drops what reaches a queue
        // whose owner is gone).
        unsafe {
            rd::rd_kafka_queue_cb_event_enable(
                self.consumer_queue.as_ptr(),
                None,
                std::ptr::null_mut(),
            );
            rd::rd_kafka_queue_destroy(self.consumer_queue.as_ptr());
            rd::rd_kafka_queue_destroy(self.queue.as_ptr());
        }
    }
}

impl std::fmt::Debug for SplitQueue<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SplitQueue").finish_non_exhaustive()
    }
}

/// A record taken from the split queue: librdkafka's message, destroyed when dropped (on
/// the poll thread, which read it).
pub(crate) struct NativeMessage(NonNull<rd::rd_kafka_message_t>);

impl NativeMessage {
    fn raw(&self) -> &rd::rd_kafka_message_t {
        // SAFETY: owned and live until dropped.
        unsafe { self.0.as_ref() }
    }

    /// The error librdkafka reports in place of a record, if any.
    pub(crate) fn error(&self) -> Option<rdkafka::error::RDKafkaErrorCode> {
        let err = self.raw().err;
        (err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR)
            .then(|| rdkafka::error::RDKafkaErrorCode::from(err))
    }

    /// Whether it is a record of `tp`.
    pub(crate) fn is_of(&self, tp: &Tp) -> bool {
        self.partition() == tp.1 && self.topic_name() == Some(&*tp.0)
    }

    fn topic_name(&self) -> Option<&str> {
        let rkt = self.raw().rkt;
        if rkt.is_null() {
            return None;
        }
        // SAFETY: the message holds a reference to its topic; librdkafka's name is a
        // NUL-terminated string that lives as long as the topic.
        unsafe { CStr::from_ptr(rd::rd_kafka_topic_name(rkt)) }
            .to_str()
            .ok()
    }
}

impl Drop for NativeMessage {
    fn drop(&mut self) {
        // SAFETY: owned; destroyed once.
        unsafe { rd::rd_kafka_message_destroy(self.0.as_ptr()) };
    }
}

impl Message for NativeMessage {
    type Headers = BorrowedHeaders;

    fn key(&self) -> Option<&[u8]> {
        let m = self.raw();
        // SAFETY: librdkafka's key pointer and length, valid while the message lives.
        (!m.key.is_null())
            .then(|| unsafe { std::slice::from_raw_parts(m.key.cast::<u8>(), m.key_len) })
    }

    fn payload(&self) -> Option<&[u8]> {
        let m = self.raw();
        // SAFETY: librdkafka's payload pointer and length, valid while the message lives.
        (!m.payload.is_null())
            .then(|| unsafe { std::slice::from_raw_parts(m.payload.cast::<u8>(), m.len) })
    }

    unsafe fn payload_mut(&mut self) -> Option<&mut [u8]> {
        let m = self.raw();
        // SAFETY: the caller's contract (as rdkafka's own messages).
        (!m.payload.is_null())
            .then(|| unsafe { std::slice::from_raw_parts_mut(m.payload.cast::<u8>(), m.len) })
    }

    fn topic(&self) -> &str {
        self.topic_name().unwrap_or("")
    }

    fn partition(&self) -> i32 {
        self.raw().partition
    }

    fn offset(&self) -> i64 {
        self.raw().offset
    }

    fn timestamp(&self) -> Timestamp {
        let mut kind = rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        // SAFETY: a live message.
        let t = unsafe { rd::rd_kafka_message_timestamp(self.0.as_ptr(), &mut kind) };
        if t == -1 {
            return Timestamp::NotAvailable;
        }
        match kind {
            rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_CREATE_TIME => {
                Timestamp::CreateTime(t)
            }
            rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_LOG_APPEND_TIME => {
                Timestamp::LogAppendTime(t)
            }
            _ => Timestamp::NotAvailable,
        }
    }

    fn headers(&self) -> Option<&BorrowedHeaders> {
        let mut hdrs: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
        // SAFETY: a live message; librdkafka parses its header block into a list the message
        // owns (freed with it), which rdkafka reads through the zero-sized `BorrowedHeaders`
        // at the list's address, as its own messages do.
        unsafe {
            let err = rd::rd_kafka_message_headers(self.0.as_ptr(), &mut hdrs);
            (err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && !hdrs.is_null())
                .then(|| &*(hdrs.cast::<BorrowedHeaders>()))
        }
    }
}

/// librdkafka's own description of `code` (what it writes in its log lines).
pub(crate) fn librdkafka_description(code: rd::rd_kafka_resp_err_t) -> String {
    // SAFETY: `rd_kafka_err2str` returns a static NUL-terminated string for any code.
    unsafe { CStr::from_ptr(rd::rd_kafka_err2str(code)) }
        .to_string_lossy()
        .into_owned()
}

/// Drops the records in `pending` of any partition of `tps` (revoked, reset to their commit
/// point, or of a deleted topic: read again from where that starts, if at all).
pub(crate) fn drop_pending_of(pending: &mut std::collections::VecDeque<NativeMessage>, tps: &[Tp]) {
    if tps.is_empty() || pending.is_empty() {
        return;
    }
    pending.retain(|m| !tps.iter().any(|tp| m.is_of(tp)));
}
