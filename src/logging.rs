//! Log output: journald with structured fields when running under systemd
//! with journald (`JOURNAL_STREAM` set), otherwise a human format on stderr.
//! `RUST_LOG` overrides the config's level.
//!
//! Writing a log line never blocks the thread that logs (a relay, the
//! accept loop, the store): the event is formatted there (a text line for
//! stderr, a journald native-protocol record) and queued for one writer
//! thread, `mc-proxy-log`, which writes to stderr or sends to journald's
//! socket. The queue is bounded ([`QUEUE_LINES`]); when a stalled reader
//! (a stopped `less`, a full pipe, a journald that does not keep up) has
//! let it fill, new records are dropped and counted: [`dropped_lines`],
//! exported as `mc_proxy_log_lines_dropped_total`. Records the writer
//! fails to deliver (stderr closed, journald gone) are counted there too.
//! Before the process exits, [`flush`] waits, bounded, for the queue to be
//! written.

use std::io::{self, IsTerminal, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    Journald,
    Stderr,
}

/// Records (lines) waiting for the writer thread, at most.
///
/// Why 4096: a close line is about 200–300 bytes, so a full queue holds
/// about 1 MiB. A reader that keeps up (a terminal, journald, a log
/// shipper: 100k lines/s and more) never has more than a handful waiting;
/// 4096 rides out a stall of 0.4 s at 10k connections closing per second.
/// A queue that fills means the reader is stalled for longer than that,
/// and a longer queue would only delay the loss while holding more memory
/// (tracing-appender's default of 128k lines is 30+ MiB of lines for
/// a reader that may never come back).
pub const QUEUE_LINES: usize = 4096;

/// Bytes of stderr lines the writer gathers into one write(2).
const BATCH_BYTES: usize = 64 * 1024;

/// journald's native-protocol socket.
const JOURNALD_SOCKET: &str = "/run/systemd/journal/socket";

/// `SYSLOG_IDENTIFIER` of every journald record (`journalctl -t mc-proxy`).
const SYSLOG_IDENTIFIER: &str = "mc-proxy";

/// The queue `init` set up, for [`flush`] and [`dropped_lines`].
static QUEUE: OnceLock<LogQueue> = OnceLock::new();

pub fn init(level: &str) -> Sink {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        // Our crate at the configured level; dependencies one step quieter
        // unless asked for (h2 and hyper are chatty at debug).
        let deps = match level {
            "trace" | "debug" => "info",
            other => other,
        };
        EnvFilter::new(format!("{deps},mc_proxy={level}"))
    });
    let registry = tracing_subscriber::registry().with(filter);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(queue) = Output::journald(Path::new(JOURNALD_SOCKET))
            .and_then(|o| LogQueue::start(o, QUEUE_LINES))
        {
            let _ = QUEUE.set(queue.clone());
            let _ = registry
                .with(JournaldLayer::new(queue, SYSLOG_IDENTIFIER))
                .try_init();
            return Sink::Journald;
        }
    }
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(io::stderr().is_terminal())
        .with_target(true);
    match LogQueue::start(Output::stream(io::stderr()), QUEUE_LINES) {
        Ok(queue) => {
            let _ = QUEUE.set(queue.clone());
            let _ = registry.with(fmt.with_writer(queue)).try_init();
        }
        Err(e) => {
            // No thread to spare: log on the caller's thread, as a plain
            // program would. (Only when the system is out of threads.)
            eprintln!("mc-proxy: cannot start the log writer thread ({e}); logging synchronously");
            let _ = registry.with(fmt.with_writer(io::stderr)).try_init();
        }
    }
    Sink::Stderr
}

/// Waits until every record queued so far is written, at most `limit`.
/// Call it before the process exits (the writer thread dies with the
/// process). False if the writer did not get there in time (a stalled
/// reader); true if it did or there is nothing to flush.
pub fn flush(limit: Duration) -> bool {
    QUEUE.get().is_none_or(|queue| queue.flush(limit))
}

/// Log records lost since start: dropped because the queue was full, or
/// not delivered by the writer.
pub fn dropped_lines() -> u64 {
    QUEUE.get().map_or(0, LogQueue::dropped)
}

// ---- the queue and its writer thread -----------------------------------------

enum Message {
    Record(Vec<u8>),
    /// Answered once everything queued before it is written.
    Flush(SyncSender<()>),
}

/// The producer side: cheap to clone, never blocks.
#[derive(Clone)]
struct LogQueue {
    sender: SyncSender<Message>,
    dropped: Arc<AtomicU64>,
}

impl LogQueue {
    /// Starts the writer thread that owns `output`.
    fn start(output: Output, capacity: usize) -> io::Result<LogQueue> {
        let (sender, inbox) = mpsc::sync_channel(capacity);
        let dropped = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            output,
            pending: Vec::new(),
            pending_records: 0,
            dropped: dropped.clone(),
        };
        std::thread::Builder::new()
            .name("mc-proxy-log".into())
            .spawn(move || writer.run(inbox))?;
        Ok(LogQueue { sender, dropped })
    }

    /// Queues one record, or drops and counts it if the queue is full.
    fn push(&self, record: Vec<u8>) {
        if self.sender.try_send(Message::Record(record)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn flush(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let (done, written) = mpsc::sync_channel(1);
        let mut message = Message::Flush(done);
        // The queue may be full: wait for room, within the limit.
        loop {
            match self.sender.try_send(message) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                    message = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => return false,
            }
        }
        written
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
    }

    fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Where the writer thread delivers records.
enum Output {
    /// A byte stream (stderr): records are concatenated, several to a write.
    Stream(Box<dyn Write + Send>),
    /// journald: one datagram per record, sent to `path`.
    Datagram { socket: UnixDatagram, path: PathBuf },
}

impl Output {
    fn stream(writer: impl Write + Send + 'static) -> Output {
        Output::Stream(Box::new(writer))
    }

    /// A socket that sends to journald at `path`, after checking that
    /// something listens there (journald discards an empty datagram).
    fn journald(path: &Path) -> io::Result<Output> {
        let socket = UnixDatagram::unbound()?;
        socket.send_to(&[], path)?;
        Ok(Output::Datagram {
            socket,
            path: path.to_path_buf(),
        })
    }
}

struct Writer {
    output: Output,
    /// Stream records not yet written, and how many.
    pending: Vec<u8>,
    pending_records: u64,
    dropped: Arc<AtomicU64>,
}

impl Writer {
    /// Ends when every [`LogQueue`] is gone (or with the process).
    fn run(mut self, inbox: Receiver<Message>) {
        while let Ok(first) = inbox.recv() {
            // Take what is already queued before writing, so a burst of
            // lines goes out in a few large writes.
            let mut next = Some(first);
            while let Some(message) = next {
                match message {
                    Message::Record(record) => self.put(record),
                    Message::Flush(done) => {
                        self.write_pending();
                        let _ = done.send(());
                    }
                }
                next = inbox.try_recv().ok();
            }
            self.write_pending();
        }
    }

    fn put(&mut self, record: Vec<u8>) {
        match &self.output {
            Output::Stream(_) => {
                self.pending.extend_from_slice(&record);
                self.pending_records += 1;
                if self.pending.len() >= BATCH_BYTES {
                    self.write_pending();
                }
            }
            Output::Datagram { socket, path } => {
                if send_datagram(socket, path, &record).is_err() {
                    // Gone, restarting, or a record over the datagram size
                    // limit: nothing better to do with it than count it.
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn write_pending(&mut self) {
        if let Output::Stream(writer) = &mut self.output {
            if !self.pending.is_empty()
                && writer
                    .write_all(&self.pending)
                    .and_then(|()| writer.flush())
                    .is_err()
            {
                self.dropped
                    .fetch_add(self.pending_records, Ordering::Relaxed);
            }
        }
        self.pending.clear();
        self.pending_records = 0;
    }
}

fn send_datagram(socket: &UnixDatagram, path: &Path, record: &[u8]) -> io::Result<()> {
    loop {
        match socket.send_to(record, path) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other.map(drop),
        }
    }
}

// ---- stderr: the fmt layer's writer ---------------------------------------------

/// One formatted line, queued when the fmt layer is done with it.
struct QueuedLine<'a> {
    queue: &'a LogQueue,
    line: Vec<u8>,
}

impl Write for QueuedLine<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for QueuedLine<'_> {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.queue.push(std::mem::take(&mut self.line));
        }
    }
}

impl<'a> MakeWriter<'a> for LogQueue {
    type Writer = QueuedLine<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        QueuedLine {
            queue: self,
            line: Vec::with_capacity(256),
        }
    }
}

// ---- journald: the native protocol ------------------------------------------------

/// Sends events to journald as the tracing-journald crate (0.3) did, so the
/// fields stay the same: `PRIORITY` (error 3, warn 4, info 5, debug 6,
/// trace 7), `MESSAGE`, `TARGET`, `CODE_FILE`, `CODE_LINE`,
/// `SYSLOG_IDENTIFIER`, and each event field upper-cased with an `F_`
/// prefix (`F_OUTCOME`, `F_CLIENT`, ...). Inside spans: `SPAN_NAME`,
/// `SPAN_TARGET`, `SPAN_CODE_FILE`, `SPAN_CODE_LINE` and the span's fields,
/// outermost span first. The record is built on the logging thread and
/// queued; the writer thread sends it.
struct JournaldLayer {
    queue: LogQueue,
    identifier: String,
}

/// A span's serialised fields, kept in its extensions.
struct SpanFields(Vec<u8>);

impl JournaldLayer {
    fn new(queue: LogQueue, identifier: &str) -> JournaldLayer {
        JournaldLayer {
            queue,
            identifier: identifier.to_string(),
        }
    }
}

impl<S> tracing_subscriber::Layer<S> for JournaldLayer
where
    S: Subscriber + for<'span> LookupSpan<'span>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut buf = Vec::with_capacity(128);
        put_field(&mut buf, b"SPAN_NAME", span.name().as_bytes());
        put_metadata(&mut buf, span.metadata(), "SPAN_");
        attrs.record(&mut FieldVisitor::new(&mut buf, false));
        span.extensions_mut().insert(SpanFields(buf));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut extensions = span.extensions_mut();
        if let Some(fields) = extensions.get_mut::<SpanFields>() {
            values.record(&mut FieldVisitor::new(&mut fields.0, false));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut buf = Vec::with_capacity(512);
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(fields) = span.extensions().get::<SpanFields>() {
                    buf.extend_from_slice(&fields.0);
                }
            }
        }
        event_record(&mut buf, event, &self.identifier);
        self.queue.push(buf);
    }
}

/// Appends an event's own fields (no span fields) to `buf`.
fn event_record(buf: &mut Vec<u8>, event: &Event<'_>, identifier: &str) {
    let meta = event.metadata();
    put_field(buf, b"PRIORITY", &[priority(*meta.level())]);
    put_metadata(buf, meta, "");
    put_field(buf, b"SYSLOG_IDENTIFIER", identifier.as_bytes());
    event.record(&mut FieldVisitor::new(buf, true));
}

fn priority(level: Level) -> u8 {
    match level {
        Level::ERROR => b'3',
        Level::WARN => b'4',
        Level::INFO => b'5',
        Level::DEBUG => b'6',
        Level::TRACE => b'7',
    }
}

fn put_metadata(buf: &mut Vec<u8>, meta: &Metadata<'_>, prefix: &str) {
    let name = |field: &str| format!("{prefix}{field}").into_bytes();
    put_field(buf, &name("TARGET"), meta.target().as_bytes());
    if let Some(file) = meta.file() {
        put_field(buf, &name("CODE_FILE"), file.as_bytes());
    }
    if let Some(line) = meta.line() {
        put_field(buf, &name("CODE_LINE"), line.to_string().as_bytes());
    }
}

/// Appends one field in journald's native protocol: `NAME=value\n`, or, for
/// a value with a newline in it, `NAME\n`, the value's length as a 64-bit
/// little-endian integer, the value, `\n`.
fn put_field(buf: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    buf.extend_from_slice(name);
    if value.contains(&b'\n') {
        buf.push(b'\n');
        buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        buf.push(b'=');
    }
    buf.extend_from_slice(value);
    buf.push(b'\n');
}

/// A field's journald name: `MESSAGE` for an event's message, else `F_`
/// and the name with `.` as `_`, leading `_` and anything but ASCII letters,
/// digits and `_` removed, upper-cased (journald's rules for field names).
fn field_name(name: &str, event: bool) -> Vec<u8> {
    if event && name == "message" {
        return b"MESSAGE".to_vec();
    }
    let mut out = b"F_".to_vec();
    out.extend(
        name.bytes()
            .map(|c| if c == b'.' { b'_' } else { c })
            .skip_while(|&c| c == b'_')
            .filter(|&c| c == b'_' || c.is_ascii_alphanumeric())
            .map(|c| c.to_ascii_uppercase()),
    );
    out
}

struct FieldVisitor<'a> {
    buf: &'a mut Vec<u8>,
    /// An event's fields (its `message` is `MESSAGE`), or a span's.
    event: bool,
    value: Vec<u8>,
}

impl<'a> FieldVisitor<'a> {
    fn new(buf: &'a mut Vec<u8>, event: bool) -> FieldVisitor<'a> {
        FieldVisitor {
            buf,
            event,
            value: Vec::new(),
        }
    }
}

impl Visit for FieldVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        put_field(
            self.buf,
            &field_name(field.name(), self.event),
            value.as_bytes(),
        );
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.value.clear();
        // Writing into a Vec cannot fail.
        let _ = write!(self.value, "{value:?}");
        put_field(self.buf, &field_name(field.name(), self.event), &self.value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// Parses a native-protocol record into (name, value) pairs, both forms.
    fn parse(mut record: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut fields = Vec::new();
        while !record.is_empty() {
            let end = record.iter().position(|&b| b == b'\n').expect("no newline");
            let line = &record[..end];
            if let Some(eq) = line.iter().position(|&b| b == b'=') {
                fields.push((
                    String::from_utf8(line[..eq].to_vec()).unwrap(),
                    line[eq + 1..].to_vec(),
                ));
                record = &record[end + 1..];
            } else {
                let name = String::from_utf8(line.to_vec()).unwrap();
                let rest = &record[end + 1..];
                let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
                fields.push((name, rest[8..8 + len].to_vec()));
                assert_eq!(rest[8 + len], b'\n', "no newline after a binary value");
                record = &rest[9 + len..];
            }
        }
        fields
    }

    fn as_map(fields: &[(String, Vec<u8>)]) -> HashMap<String, String> {
        fields
            .iter()
            .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
            .collect()
    }

    /// A stream output that keeps what it is given.
    #[derive(Clone, Default)]
    struct Kept(Arc<Mutex<Vec<u8>>>);

    impl Write for Kept {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn fields_use_the_plain_form_and_the_length_form_for_newlines() {
        let mut buf = Vec::new();
        put_field(&mut buf, b"F_SNI", b"a.test");
        put_field(&mut buf, b"MESSAGE", b"two\nlines");
        put_field(&mut buf, b"F_EMPTY", b"");
        let mut expected = b"F_SNI=a.test\nMESSAGE\n".to_vec();
        expected.extend_from_slice(&9u64.to_le_bytes());
        expected.extend_from_slice(b"two\nlines\nF_EMPTY=\n");
        assert_eq!(buf, expected);
        assert_eq!(
            parse(&buf),
            vec![
                ("F_SNI".to_string(), b"a.test".to_vec()),
                ("MESSAGE".to_string(), b"two\nlines".to_vec()),
                ("F_EMPTY".to_string(), Vec::new()),
            ]
        );
    }

    #[test]
    fn field_names_follow_journald_rules() {
        assert_eq!(field_name("message", true), b"MESSAGE");
        assert_eq!(field_name("message", false), b"F_MESSAGE");
        assert_eq!(field_name("duration_ms", true), b"F_DURATION_MS");
        assert_eq!(field_name("log.target", true), b"F_LOG_TARGET");
        assert_eq!(field_name("__x-y", true), b"F_XY");
    }

    /// Collects records as the journald layer builds them, in-process.
    fn records_of(emit: impl FnOnce()) -> Vec<Vec<(String, Vec<u8>)>> {
        let (sender, inbox) = mpsc::sync_channel(64);
        let queue = LogQueue {
            sender,
            dropped: Arc::new(AtomicU64::new(0)),
        };
        let subscriber = tracing_subscriber::registry().with(JournaldLayer::new(queue, "mc-proxy"));
        tracing::subscriber::with_default(subscriber, emit);
        inbox
            .try_iter()
            .map(|m| match m {
                Message::Record(r) => parse(&r),
                Message::Flush(_) => panic!("flush"),
            })
            .collect()
    }

    #[test]
    fn an_event_becomes_the_fields_tracing_journald_sent() {
        let records = records_of(|| {
            tracing::info!(
                client = %"192.0.2.1:5000",
                sni = "a.test",
                up = 517_u64,
                outcome = "relayed",
                "connection closed"
            );
            tracing::error!(error = "line one\nline two", "store failed");
        });
        assert_eq!(records.len(), 2);
        let first = as_map(&records[0]);
        for (name, value) in [
            ("PRIORITY", "5"),
            ("MESSAGE", "connection closed"),
            ("SYSLOG_IDENTIFIER", "mc-proxy"),
            ("TARGET", module_path!()),
            ("CODE_FILE", file!()),
            ("F_CLIENT", "192.0.2.1:5000"),
            ("F_SNI", "a.test"),
            ("F_UP", "517"),
            ("F_OUTCOME", "relayed"),
        ] {
            assert_eq!(
                first.get(name).map(String::as_str),
                Some(value),
                "{name}: {first:?}"
            );
        }
        assert!(first["CODE_LINE"].parse::<u32>().is_ok(), "{first:?}");
        let second = as_map(&records[1]);
        assert_eq!(second["PRIORITY"], "3");
        assert_eq!(second["F_ERROR"], "line one\nline two");
    }

    #[test]
    fn span_fields_come_first_outermost_span_first() {
        let records = records_of(|| {
            let outer = tracing::info_span!("conn", id = 7_u64);
            let _outer = outer.enter();
            let inner = tracing::info_span!("hello");
            let _inner = inner.enter();
            tracing::warn!("inside");
        });
        let fields = &records[0];
        let names: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
        let first_span = names.iter().position(|n| *n == "SPAN_NAME").unwrap();
        assert_eq!(fields[first_span].1, b"conn");
        assert!(names.contains(&"F_ID"), "{names:?}");
        let spans: Vec<&[u8]> = fields
            .iter()
            .filter(|(k, _)| k == "SPAN_NAME")
            .map(|(_, v)| v.as_slice())
            .collect();
        assert_eq!(spans, [b"conn".as_slice(), b"hello".as_slice()]);
        assert!(
            names.iter().position(|n| *n == "PRIORITY").unwrap() > first_span,
            "{names:?}"
        );
        assert_eq!(as_map(fields)["MESSAGE"], "inside");
    }

    #[test]
    fn flush_writes_every_queued_line_in_order() {
        let kept = Kept::default();
        let queue = LogQueue::start(Output::stream(kept.clone()), 1000).unwrap();
        for i in 0..500 {
            queue.push(format!("line {i}\n").into_bytes());
        }
        assert!(queue.flush(Duration::from_secs(10)));
        let text = String::from_utf8(kept.0.lock().unwrap().clone()).unwrap();
        let expected: String = (0..500).map(|i| format!("line {i}\n")).collect();
        assert_eq!(text, expected);
        assert_eq!(queue.dropped(), 0);
    }

    /// A write error costs the lines it carried, counted.
    #[test]
    fn lines_the_writer_cannot_deliver_are_counted() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from(io::ErrorKind::BrokenPipe))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let queue = LogQueue::start(Output::stream(Broken), 100).unwrap();
        for _ in 0..10 {
            queue.push(b"x\n".to_vec());
        }
        assert!(queue.flush(Duration::from_secs(10)));
        assert_eq!(queue.dropped(), 10);
    }

    /// A fake journald: a datagram socket at a temp path. Records arrive
    /// as datagrams with the fields above; then, with nobody reading it, the
    /// logging thread still never waits: records beyond the queue are
    /// dropped and counted, and a flush gives up at its limit.
    #[test]
    fn a_journald_that_stops_reading_costs_records_never_the_logging_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.socket");
        let journald = UnixDatagram::bind(&path).unwrap();
        let capacity = 64;
        let queue = LogQueue::start(Output::journald(&path).unwrap(), capacity).unwrap();
        // The probe datagram `journald` sent to check the socket.
        let mut datagram = vec![0u8; 64 * 1024];
        journald
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        assert_eq!(journald.recv(&mut datagram).unwrap(), 0);

        let layer = JournaldLayer::new(queue.clone(), "mc-proxy");
        let subscriber = tracing_subscriber::registry().with(layer);
        let dispatch = tracing::Dispatch::new(subscriber);
        tracing::dispatcher::with_default(&dispatch, || {
            tracing::info!(outcome = "no_route", sni = "x.test", "connection closed");
        });
        let n = journald.recv(&mut datagram).unwrap();
        let fields = as_map(&parse(&datagram[..n]));
        assert_eq!(fields["MESSAGE"], "connection closed");
        assert_eq!(fields["F_OUTCOME"], "no_route");
        assert_eq!(fields["SYSLOG_IDENTIFIER"], "mc-proxy");

        // Nobody reads from now on. The kernel queues a few datagrams, then
        // the writer thread blocks in send; the logging thread must not.
        let events = 20_000;
        let (finished, done) = mpsc::channel();
        let logger = std::thread::spawn(move || {
            let started = Instant::now();
            tracing::dispatcher::with_default(&dispatch, || {
                for i in 0..events {
                    tracing::info!(i, "connection closed");
                }
            });
            let _ = finished.send(started.elapsed());
        });
        let took = done
            .recv_timeout(Duration::from_secs(30))
            .expect("logging blocked on a journald that does not read");
        logger.join().unwrap();
        let dropped = queue.dropped();
        assert!(
            dropped >= (events - capacity - 1000) as u64,
            "{dropped} of {events} dropped ({took:?})"
        );
        assert!(dropped < events as u64, "{dropped}");
        let flushing = Instant::now();
        assert!(!queue.flush(Duration::from_millis(200)));
        assert!(flushing.elapsed() < Duration::from_secs(5));
    }
}
