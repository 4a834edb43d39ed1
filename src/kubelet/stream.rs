//! Server streams of whole lists (ListAndWatch; DRA's NodeWatchResources too): a [`Hub`] holds
//! the current list; each open stream gets its own thread that sends the full list first and
//! then again on every change. grpcio's completion-queue threads never block on us: they only
//! hand the sink over and later wake the stream thread.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};

use futures_sink::Sink;
use grpcio::{ServerStreamingSink, WriteFlags};
use log::{debug, warn};

use crate::kubelet::api::ListAndWatchResponse;
use crate::sys::EventFd;
use crate::wake::Signal;
use crate::workers;

/// Streams served at once (each owns a thread); more are refused with `RESOURCE_EXHAUSTED`.
pub const MAX_STREAMS: usize = 64;

struct State<M> {
    version: u64,
    list: M,
    stopped: bool,
    streams: Vec<Weak<Signal>>,
}

/// The latest list of one serving generation, and the streams that watch it.
pub struct Hub<M = ListAndWatchResponse> {
    /// The stream's name in log lines (`ListAndWatch`).
    name: &'static str,
    state: Mutex<State<M>>,
    /// Bumped whenever a client ends its stream, so the main loop can tell a kubelet that
    /// dropped ListAndWatch (and must be registered with again).
    client_left: Arc<EventFd>,
}

impl Hub<ListAndWatchResponse> {
    /// A ListAndWatch hub serving `list`; `client_left` is bumped whenever a client ends its
    /// stream.
    pub fn new(list: ListAndWatchResponse, client_left: Arc<EventFd>) -> Arc<Hub> {
        Hub::named("ListAndWatch", list, client_left)
    }
}

impl<M: Clone> Hub<M> {
    /// A hub of `name`d streams serving `list`.
    pub fn named(name: &'static str, list: M, client_left: Arc<EventFd>) -> Arc<Hub<M>> {
        Arc::new(Hub {
            name,
            state: Mutex::new(State {
                version: 0,
                list,
                stopped: false,
                streams: Vec::new(),
            }),
            client_left,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State<M>> {
        // Every update leaves State consistent, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the list and wakes every stream, which sends it even when it equals the last
    /// one: the caller publishes when the device nodes changed, and the kubelet takes every
    /// message as the whole list, so a repeat is harmless and tells it the news promptly.
    pub fn publish(&self, list: M) {
        let mut st = self.lock();
        st.list = list;
        st.version += 1;
        wake_all(&mut st);
    }

    /// Ends every stream of this generation (they close their calls and their threads exit).
    pub fn stop(&self) {
        let mut st = self.lock();
        st.stopped = true;
        wake_all(&mut st);
    }

    /// How many stream threads are running now.
    pub fn open_streams(&self) -> usize {
        let mut st = self.lock();
        st.streams.retain(|w| w.strong_count() > 0);
        st.streams.len()
    }

    fn subscribe(&self, signal: &Arc<Signal>) {
        let mut st = self.lock();
        st.streams.retain(|w| w.strong_count() > 0);
        st.streams.push(Arc::downgrade(signal));
    }

    /// The list if it is newer than `seen`; `Err(())` once stopped.
    fn next(&self, seen: Option<u64>) -> Result<Option<(u64, M)>, ()> {
        let st = self.lock();
        if st.stopped {
            return Err(());
        }
        if seen == Some(st.version) {
            return Ok(None);
        }
        Ok(Some((st.version, st.list.clone())))
    }
}

fn wake_all<M>(st: &mut State<M>) {
    st.streams.retain(|w| match w.upgrade() {
        Some(s) => {
            s.raise();
            true
        }
        None => false,
    });
}

/// Hands one stream call to a thread of its own. Returns at once.
pub fn spawn<M: Clone + Send + 'static>(
    hub: Arc<Hub<M>>,
    sink: ServerStreamingSink<M>,
    peer: String,
) {
    let signal = Signal::new();
    hub.subscribe(&signal);
    let hub_name = hub.name;
    let started = workers::run(move || {
        let end = feed(&hub, sink, &signal, &peer);
        // Unsubscribe before telling anyone, so open_streams() no longer counts us.
        drop(signal);
        if let End::ClientGone(_) = end {
            hub.client_left.notify();
        }
    });
    if let Err(e) = started {
        // The sink was moved into the job and is dropped with it, which cancels the call: the
        // kubelet sees the stream end and opens a new one.
        warn!("cannot start a {} thread: {e}", hub_name);
    }
}

/// Why a stream ended.
enum End {
    ClientGone(grpcio::Error),
    ServerStopped,
}

fn feed<M: Clone>(
    hub: &Hub<M>,
    mut sink: ServerStreamingSink<M>,
    signal: &Arc<Signal>,
    peer: &str,
) -> End {
    debug!(
        "{} opened by {peer} ({} open)",
        hub.name,
        hub.open_streams()
    );
    let waker = signal.waker();
    let mut cx = Context::from_waker(&waker);
    let end = pump(hub, &mut sink, signal, &mut cx);
    match &end {
        End::ClientGone(e) => debug!("{} of {peer} ended: {e}", hub.name),
        End::ServerStopped => {
            // Start sending an OK status but never wait for it: the server is shutting down,
            // and dropping the sink right after cancels whatever is still pending. Either
            // way the kubelet sees the stream end.
            let _ = Pin::new(&mut sink).poll_close(&mut cx);
            debug!("{} of {peer} closed: server stopping", hub.name);
        }
    }
    end
}

/// Sends lists until the client goes away or the hub stops. Every `Pending` from the sink has
/// registered `cx`'s waker, which raises `signal`; so has every publish: the thread sleeps on
/// `signal` and never polls on a timer.
fn pump<M: Clone>(
    hub: &Hub<M>,
    sink: &mut ServerStreamingSink<M>,
    signal: &Signal,
    cx: &mut Context<'_>,
) -> End {
    let mut sent: Option<u64> = None;
    loop {
        let mut progressed = false;
        match hub.next(sent) {
            Err(()) => return End::ServerStopped,
            Ok(None) => {}
            Ok(Some((version, list))) => match Pin::new(&mut *sink).poll_ready(cx) {
                Poll::Ready(Ok(())) => {
                    if let Err(e) = Pin::new(&mut *sink).start_send((list, WriteFlags::default())) {
                        return End::ClientGone(e);
                    }
                    sent = Some(version);
                    progressed = true;
                }
                Poll::Ready(Err(e)) => return End::ClientGone(e),
                // The waker fires when the previous message has left.
                Poll::Pending => {}
            },
        }
        // Flushing also watches for the call's end, so a vanished client wakes us.
        if let Poll::Ready(Err(e)) = Pin::new(&mut *sink).poll_flush(cx) {
            return End::ClientGone(e);
        }
        // The signal is sticky: a publish or wake-up since the checks above is not lost.
        if !progressed {
            signal.wait_until(None);
        }
    }
}
