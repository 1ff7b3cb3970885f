//! WASI for plugins, deny by default (as Spin and Zed give their guests a std): a
//! guest built with Rust's std gets clocks, randomness, and stdout/stderr, which go
//! into the host log attributed to the plugin and under its log rate limit. Nothing
//! else: no preopened directory (every filesystem call fails), no environment, no
//! arguments, no stdin, and no network (TCP, UDP and name lookup are refused). Those
//! calls return errors to the guest; none reaches the host's files or sockets.
//!
//! No WASI call may hold a host thread past its plugin call's deadline. The epoch
//! deadline interrupts wasm code only, so a guest that sleeps (`std::thread::sleep`
//! is `subscribe-duration` then `pollable.block`) would block its host thread for as
//! long as it asked. Every clock subscription is therefore cut at the calling
//! plugin call's deadline ([`add_bounded_clocks`]): the sleep returns early, the wasm
//! resumes past its epoch deadline and traps. The other pollables a plugin can make
//! (its stdout and stderr, an empty stdin) are always ready, so nothing else blocks.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime::component::{Linker, Resource, ResourceTable};
use wasmtime::StoreContextMut;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::clocks::WasiClocksView;
use wasmtime_wasi::p2::bindings::clocks::monotonic_clock::Host as MonotonicClock;
use wasmtime_wasi::p2::DynPollable;
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder};

use super::state::{write_log, HostState, LogLimiter};
use super::types::LogLevel;

/// The longest line kept from a plugin's stdout or stderr before it is written out.
const MAX_LINE_BYTES: usize = 2000;
/// Resources (streams, pollables) one instance may hold at once.
const MAX_RESOURCES: usize = 1024;
/// The most random bytes one call may ask for.
const MAX_RANDOM_BYTES: u64 = 64 << 10;

/// The monotonic clock interface as wasmtime-wasi links it (guests importing any
/// 0.2.x version resolve to it).
const MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";

/// Replaces the monotonic clock's two subscriptions (linked by wasmtime-wasi before)
/// with ones that end no later than the running call's deadline.
pub fn add_bounded_clocks(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut clock = linker.instance(MONOTONIC_CLOCK)?;
    clock.func_wrap(
        "subscribe-duration",
        |mut store: StoreContextMut<'_, HostState>,
         (nanos,): (u64,)|
         -> wasmtime::Result<(Resource<DynPollable>,)> {
            let state = store.data_mut();
            let nanos = state.clamp_to_deadline(nanos);
            Ok((state.clocks().subscribe_duration(nanos)?,))
        },
    )?;
    clock.func_wrap(
        "subscribe-instant",
        |mut store: StoreContextMut<'_, HostState>,
         (when,): (u64,)|
         -> wasmtime::Result<(Resource<DynPollable>,)> {
            let state = store.data_mut();
            let now = state.clocks().now()?;
            let nanos = state.clamp_to_deadline(when.saturating_sub(now));
            Ok((state.clocks().subscribe_duration(nanos)?,))
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// The WASI context of one plugin instance, and its resource table.
pub fn context(plugin: Arc<str>, log: Arc<LogLimiter>) -> (WasiCtx, ResourceTable) {
    let mut builder = WasiCtxBuilder::new();
    builder
        .stdout(LogSink {
            plugin: plugin.clone(),
            log: log.clone(),
            level: LogLevel::Info,
        })
        .stderr(LogSink {
            plugin,
            log,
            level: LogLevel::Warn,
        })
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .max_random_size(MAX_RANDOM_BYTES);
    let mut table = ResourceTable::new();
    table.set_max_capacity(MAX_RESOURCES);
    (builder.build(), table)
}

/// A plugin's stdout or stderr: each line goes to the host log.
#[derive(Clone)]
struct LogSink {
    plugin: Arc<str>,
    log: Arc<LogLimiter>,
    level: LogLevel,
}

impl IsTerminal for LogSink {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogSink {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(LineWriter::new(self.clone()))
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(LineWriter::new(self.clone()))
    }
}

/// Collects bytes into lines and logs each complete one (a long line in pieces).
struct LineWriter {
    sink: LogSink,
    line: Vec<u8>,
}

impl LineWriter {
    fn new(sink: LogSink) -> Self {
        Self {
            sink,
            line: Vec::new(),
        }
    }

    fn take(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                self.emit();
            } else {
                self.line.push(b);
                if self.line.len() >= MAX_LINE_BYTES {
                    self.emit();
                }
            }
        }
    }

    fn emit(&mut self) {
        let line = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        write_log(&self.sink.plugin, &self.sink.log, self.sink.level, &line);
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.emit();
        }
    }
}

impl OutputStream for LineWriter {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.take(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(4096)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LineWriter {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for LineWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.take(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
