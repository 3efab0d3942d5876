//! A SQLite VFS for the store's writer connection (and the client's profile database): the
//! platform's default VFS, except that the WAL frames a transaction writes reach the file in one
//! `write` call instead of two per page.
//!
//! Why: SQLite writes each WAL frame as two calls, its 24-byte header and then its page, at
//! offsets that straddle the OS's pages. Measured on the benchmark VM (docs/benchmarks.md,
//! figure 5), two thirds of the writer thread's time went to those calls: about 3 us per frame,
//! against about 1 us when a batch's frames are written with one call.
//!
//! How it stays correct:
//! - Only appends to a WAL file are held back: writes at or past the furthest offset written
//!   since the WAL last started over, each continuing the one before. Anything else (SQLite
//!   rewriting a page it spilled earlier in the transaction, or a frame header's checksum) first
//!   writes what is held and then goes straight to the file, its result back to SQLite.
//! - What is held is written as soon as the page of a commit frame (the frame whose header
//!   carries a database size) arrives, inside that `xWrite`, so a failure fails the commit as
//!   it would without the shim. SQLite writes nothing but rewrites between that page and the
//!   moment it publishes the commit in the shared-memory index (`walFrames` in SQLite's
//!   wal.c), so nothing is held when readers, the checkpointer or the store's sync thread can
//!   see the commit. (Without power-safe overwrite, a `synchronous=FULL` commit pads the WAL
//!   after its commit frame: such a WAL is passed through untouched.)
//! - Frames of a transaction that spilled and then rolled back are never published, but
//!   another writer may append at their offsets once the write lock is released: they are
//!   written when the connection's database file releases the WAL write lock (or, in exclusive
//!   locking mode, its file lock), before the release. The database file finds its WAL with
//!   `sqlite3_database_file_object`. They lie past the last commit, so a failure to write them
//!   loses nothing.
//! - Any other call on the WAL file (read, size, sync, truncate, file control, close) first
//!   writes what is held, so SQLite never reads around the shim. SQLite ignores the result of
//!   some of those calls (`walLimitSize` ignores `xFileSize`'s), so if such a write fails, every
//!   later call on the WAL fails too, and [`deferred_write_failure`] tells the store, which
//!   then fails (as after a failed fsync).
//!
//! The held bytes are copies: SQLite reuses its frame-header buffer and may change a cached
//! page as soon as `xWrite` returns.

// SAFETY: this module is the workspace's one use of `unsafe`: a VFS is C callbacks over memory
// SQLite owns. Every function here follows the contract of `sqlite3_vfs` and
// `sqlite3_io_methods` (https://sqlite.org/c3ref/io_methods.html); nothing in it may panic (a
// panic cannot unwind through SQLite). A WAL's state is used only by its own methods and its
// connection's database file's (SQLite never calls a connection's file methods concurrently),
// and by `deferred_write_failure`, which reads the recorded failure under the lock.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::{CStr, c_int, c_void};
use std::mem::offset_of;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, OnceLock};

use rusqlite::ffi;

/// The name the VFS is registered under (`Connection::open_with_flags_and_vfs`).
pub const VFS_NAME: &CStr = c"mlschat-wal-gather";

/// Held bytes past which they are written even before the commit frame (a transaction larger
/// than this, such as a migration, writes in pieces of about this size).
const MAX_HELD_BYTES: usize = 1 << 20;

/// The most one write call of the default VFS takes: the unix VFS writes at most 128 KiB - 1
/// bytes per call (`seekAndWriteFd` masks the length with 0x1ffff).
const MAX_WRITE_BYTES: usize = 0x1ffff;

/// The size of a WAL frame header; bytes 4..8 hold the database size for a commit frame.
const FRAME_HEADER_BYTES: c_int = 24;

/// Registers the VFS (once per process) and returns its name, or SQLite's error code.
pub fn register() -> Result<&'static CStr, c_int> {
    static REGISTERED: OnceLock<c_int> = OnceLock::new();
    let rc = *REGISTERED.get_or_init(|| {
        // SAFETY: `sqlite3_vfs_find(NULL)` returns the default VFS, which SQLite never frees.
        // The new VFS is leaked: SQLite keeps a pointer to it for the life of the process.
        unsafe {
            let initialized = ffi::sqlite3_initialize();
            if initialized != ffi::SQLITE_OK {
                return initialized;
            }
            let default = ffi::sqlite3_vfs_find(ptr::null());
            if default.is_null() {
                return ffi::SQLITE_ERROR;
            }
            let Ok(inner_size) = usize::try_from((*default).szOsFile) else {
                return ffi::SQLITE_ERROR;
            };
            let Ok(size) = c_int::try_from(offset_of!(ShimFile, inner) + inner_size) else {
                return ffi::SQLITE_ERROR;
            };
            let _ = DEFAULT_VFS.set(VfsPointer(default));
            let mut vfs = *default;
            vfs.szOsFile = size;
            vfs.pNext = ptr::null_mut();
            vfs.zName = VFS_NAME.as_ptr();
            vfs.xOpen = Some(shim_open);
            // Every other method is the default VFS's own: it reads nothing from the VFS
            // object but `mxPathname` and `pAppData`, copied above.
            ffi::sqlite3_vfs_register(Box::into_raw(Box::new(vfs)), 0)
        }
    });
    if rc == ffi::SQLITE_OK {
        Ok(VFS_NAME)
    } else {
        Err(rc)
    }
}

/// The name SQLite gives the WAL of `connection`'s main database (its full name with `-wal`,
/// byte for byte, as the VFS registers it), or `None` for a database without a file.
pub fn wal_name(connection: &rusqlite::Connection) -> Option<Vec<u8>> {
    // SAFETY: the handle is valid while `connection` is borrowed, and the name SQLite returns
    // lives as long as the connection; it is copied before the borrow ends.
    let database = unsafe {
        let name = ffi::sqlite3_db_filename(connection.handle(), c"main".as_ptr());
        if name.is_null() {
            return None;
        }
        CStr::from_ptr(name).to_bytes()
    };
    if database.is_empty() {
        return None;
    }
    let mut wal = database.to_vec();
    wal.extend_from_slice(b"-wal");
    Some(wal)
}

/// The error code of a WAL write the shim could not report to SQLite, for the WAL at
/// `wal_name` (see [`wal_name`]): once set, the WAL's published frames may not all be in the
/// file.
pub fn deferred_write_failure(wal_name: &[u8]) -> Option<c_int> {
    if !ANY_DEFERRED_FAILURE.load(Ordering::Acquire) {
        return None;
    }
    let registry = lock(&REGISTRY);
    registry
        .get(wal_name)?
        .iter()
        .find_map(|buffer| lock(&buffer.held).failure)
}

/// Write calls SQLite made on the WAL at `wal_name`, and write calls the shim made to the file
/// in their place (for tests, here and in the client's).
pub fn write_counts(wal_name: &[u8]) -> Option<(u64, u64)> {
    let registry = lock(&REGISTRY);
    let buffers = registry.get(wal_name)?;
    Some(buffers.iter().fold((0, 0), |(asked, made), buffer| {
        (
            asked + buffer.writes_asked.load(Ordering::Relaxed),
            made + buffer.writes_made.load(Ordering::Relaxed),
        )
    }))
}

/// Bytes the WAL at `wal_name` holds, not yet written (for tests).
#[cfg(test)]
pub fn held_bytes(wal_name: &[u8]) -> Option<usize> {
    let registry = lock(&REGISTRY);
    let buffers = registry.get(wal_name)?;
    Some(
        buffers
            .iter()
            .map(|buffer| lock(&buffer.held).bytes.len())
            .sum(),
    )
}

struct VfsPointer(*mut ffi::sqlite3_vfs);
// SAFETY: the default VFS is a static object of SQLite's, used from any thread.
unsafe impl Send for VfsPointer {}
unsafe impl Sync for VfsPointer {}

static DEFAULT_VFS: OnceLock<VfsPointer> = OnceLock::new();

/// Open WAL files by name, for [`deferred_write_failure`].
static REGISTRY: LazyLock<Mutex<WalsByName>> = LazyLock::new(|| Mutex::new(HashMap::new()));

/// A WAL's name as SQLite gives it to `xOpen`, and the buffers of its open file objects.
type WalsByName = HashMap<Vec<u8>, Vec<Arc<WalBuffer>>>;
static ANY_DEFERRED_FAILURE: AtomicBool = AtomicBool::new(false);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic cannot happen while one of these is held (nothing here panics); if one did,
    // the data is still consistent bytes and counters.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The file object SQLite allocates (`szOsFile` bytes): ours first, the default VFS's after.
#[repr(C)]
struct ShimFile {
    base: ffi::sqlite3_file,
    role: *mut Role,
    /// The default VFS's file object; it is `szOsFile` of the default VFS long.
    inner: ffi::sqlite3_file,
}

enum Role {
    /// The WAL: its writes are gathered.
    Wal {
        name: Vec<u8>,
        buffer: Arc<WalBuffer>,
    },
    /// A main database file, and the WAL its connection opened through this VFS: the
    /// database's release of the WAL write lock writes what the WAL still holds.
    Database {
        wal: Mutex<Option<Arc<WalBuffer>>>,
    },
    Other,
}

struct WalBuffer {
    held: Mutex<Held>,
    /// The WAL's own file object (inside its `ShimFile`), valid until the WAL is closed, which
    /// first sets `closed` and removes this buffer from the registry.
    inner: *mut ffi::sqlite3_file,
    writes_asked: AtomicU64,
    writes_made: AtomicU64,
    /// Set when the WAL closes: its database file must not reach it any more.
    closed: AtomicBool,
}

// SAFETY: `inner` is used only from the WAL file's own methods (SQLite never calls them
// concurrently for one file, whichever thread the connection runs on); the registry's clones
// only read `held` under its lock.
unsafe impl Send for WalBuffer {}
unsafe impl Sync for WalBuffer {}

#[derive(Default)]
struct Held {
    /// Offset of `bytes[0]` in the file.
    offset: i64,
    bytes: Vec<u8>,
    /// The last write was a commit frame's header: write everything once its page is here.
    commit_header: bool,
    /// A held write that failed where SQLite may not have been told (see `settle`).
    failure: Option<c_int>,
    /// The end of the furthest write since the WAL last started over (with its header at 0):
    /// writes below it are rewrites, never held.
    high_water: i64,
}

impl WalBuffer {
    /// Writes what is held; returns SQLite's result code.
    ///
    /// # Safety
    /// `self.inner` must be an open file object of the default VFS.
    unsafe fn write_held(&self, held: &mut Held) -> c_int {
        if held.bytes.is_empty() {
            return ffi::SQLITE_OK;
        }
        let mut rc = ffi::SQLITE_OK;
        let mut offset = held.offset;
        for chunk in held.bytes.chunks(MAX_WRITE_BYTES) {
            // Both fit: a chunk is below 128 KiB, and the WAL below 2^63 bytes.
            let (Ok(amount), Ok(length)) =
                (c_int::try_from(chunk.len()), i64::try_from(chunk.len()))
            else {
                rc = ffi::SQLITE_IOERR_WRITE;
                break;
            };
            // SAFETY: the caller guarantees `inner`; the bytes outlive the call.
            rc = unsafe {
                write_through(self.inner, chunk.as_ptr().cast::<c_void>(), amount, offset)
            };
            self.writes_made.fetch_add(1, Ordering::Relaxed);
            if rc != ffi::SQLITE_OK {
                break;
            }
            offset = offset.saturating_add(length);
        }
        held.bytes.clear();
        held.commit_header = false;
        rc
    }

    /// Writes what is held before another call on the file; a failure, now or recorded
    /// before, fails the call. `result_seen` says whether SQLite acts on the call's result.
    ///
    /// # Safety
    /// As [`WalBuffer::write_held`], and the WAL must not be closed.
    unsafe fn settle(&self, result_seen: ResultSeen) -> c_int {
        let mut held = lock(&self.held);
        if let Some(failure) = held.failure {
            return failure;
        }
        // SAFETY: as the caller's.
        let rc = unsafe { self.write_held(&mut held) };
        if rc != ffi::SQLITE_OK && result_seen == ResultSeen::MaybeNot {
            // SQLite may ignore this call's result and believes these bytes written: from
            // now on the WAL fails every call, and the store learns of it
            // (`deferred_write_failure`).
            held.failure = Some(rc);
            ANY_DEFERRED_FAILURE.store(true, Ordering::Release);
        }
        rc
    }
}

/// Whether SQLite acts on the result of the call that writes what is held.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ResultSeen {
    /// Reads, syncs, fetches: an error fails SQLite's operation.
    Always,
    /// File size, truncate, file-control hints, close: SQLite ignores some of their results
    /// (`walLimitSize` logs and goes on).
    MaybeNot,
}

/// Writes through the default VFS's file object `inner`.
///
/// # Safety
/// `inner` must be an open file object of the default VFS, and `data` hold `amount` bytes.
unsafe fn write_through(
    inner: *mut ffi::sqlite3_file,
    data: *const c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    // SAFETY: as the caller's.
    unsafe {
        match (*(*inner).pMethods).xWrite {
            Some(write) => write(inner, data, amount, offset),
            None => ffi::SQLITE_IOERR_WRITE,
        }
    }
}

/// # Safety
/// `file` must be a file object this VFS opened.
unsafe fn parts(file: *mut ffi::sqlite3_file) -> (*mut ffi::sqlite3_file, *const Role) {
    let shim = file.cast::<ShimFile>();
    // SAFETY: the caller guarantees that `file` is a `ShimFile`.
    unsafe { (ptr::addr_of_mut!((*shim).inner), (*shim).role.cast_const()) }
}

/// # Safety
/// `file` must be a file object this VFS opened.
unsafe fn inner_methods(
    file: *mut ffi::sqlite3_file,
) -> (*mut ffi::sqlite3_file, &'static ffi::sqlite3_io_methods) {
    // SAFETY: the default VFS's methods are static objects; `xOpen` succeeded with them.
    unsafe {
        let (inner, _) = parts(file);
        (inner, &*(*inner).pMethods)
    }
}

/// For a WAL file, writes what it holds first; returns the failure that should fail the call.
///
/// # Safety
/// `file` must be a file object this VFS opened.
unsafe fn settle_if_wal(file: *mut ffi::sqlite3_file, result_seen: ResultSeen) -> c_int {
    // SAFETY: as the caller's; a WAL's own method runs while it is open.
    unsafe {
        let (_, role) = parts(file);
        match &*role {
            Role::Wal { buffer, .. } => buffer.settle(result_seen),
            _ => ffi::SQLITE_OK,
        }
    }
}

/// Before the database `file` lets another writer in: anything its WAL still holds belongs to a
/// transaction that rolled back after spilling frames (a commit writes its own frames). They
/// are written now, before another writer can append at the same offsets; they lie past the
/// WAL's last commit, so a failure to write them loses nothing and is not reported.
///
/// # Safety
/// `file` must be a file object this VFS opened.
unsafe fn write_rolled_back_frames(file: *mut ffi::sqlite3_file) {
    // SAFETY: as the caller's.
    let role = unsafe { &*parts(file).1 };
    let Role::Database { wal } = role else {
        return;
    };
    let Some(buffer) = lock(wal).clone() else {
        return;
    };
    if buffer.closed.load(Ordering::Acquire) {
        return;
    }
    let mut held = lock(&buffer.held);
    // SAFETY: the WAL is open (`closed` is set before it closes), and this is its own
    // connection, which SQLite does not run concurrently with the WAL's methods.
    let _ = unsafe { buffer.write_held(&mut held) };
}

unsafe extern "C" fn shim_open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let shim = file.cast::<ShimFile>();
    // SAFETY: SQLite hands us `szOsFile` zeroed bytes for `file`, room for a `ShimFile` whose
    // `inner` is as large as the default VFS needs; `name` is null or a C string.
    unsafe {
        // SQLite closes the file after a failed open if and only if this is set.
        (*shim).base.pMethods = ptr::null();
        let Some(default) = DEFAULT_VFS.get() else {
            return ffi::SQLITE_ERROR;
        };
        let default = default.0;
        let inner = ptr::addr_of_mut!((*shim).inner);
        let Some(open) = (*default).xOpen else {
            return ffi::SQLITE_ERROR;
        };
        let rc = open(default, name, inner, flags, out_flags);
        if (*inner).pMethods.is_null() {
            return rc;
        }
        let name_bytes = if name.is_null() {
            None
        } else {
            Some(CStr::from_ptr(name).to_bytes().to_vec())
        };
        // For a WAL, SQLite's documented way from its name, as passed to xOpen, to its
        // connection's database file.
        let database = if flags & ffi::SQLITE_OPEN_WAL != 0 && !name.is_null() {
            ffi::sqlite3_database_file_object(name)
        } else {
            ptr::null_mut()
        };
        // Without power-safe overwrite (which SQLite reads from the database file), a
        // synchronous=FULL commit pads the WAL to a sector boundary after its commit frame,
        // appends nothing would write before the commit is published: such a WAL is passed
        // through as it is.
        let power_safe = !database.is_null()
            && !(*database).pMethods.is_null()
            && (*(*database).pMethods)
                .xDeviceCharacteristics
                .is_some_and(|characteristics| {
                    characteristics(database) & ffi::SQLITE_IOCAP_POWERSAFE_OVERWRITE != 0
                });
        let role = match name_bytes {
            Some(name) if flags & ffi::SQLITE_OPEN_WAL != 0 && power_safe => {
                let buffer = Arc::new(WalBuffer {
                    held: Mutex::new(Held::default()),
                    inner,
                    writes_asked: AtomicU64::new(0),
                    writes_made: AtomicU64::new(0),
                    closed: AtomicBool::new(false),
                });
                lock(&REGISTRY)
                    .entry(name.clone())
                    .or_default()
                    .push(Arc::clone(&buffer));
                // The database file is ours if this VFS opened it.
                if ptr::eq((*database).pMethods, &METHODS) {
                    let database_role = (*database.cast::<ShimFile>()).role;
                    if !database_role.is_null()
                        && let Role::Database { wal } = &*database_role
                    {
                        *lock(wal) = Some(Arc::clone(&buffer));
                    }
                }
                Role::Wal { name, buffer }
            }
            Some(_) if flags & ffi::SQLITE_OPEN_MAIN_DB != 0 => Role::Database {
                wal: Mutex::new(None),
            },
            _ => Role::Other,
        };
        (*shim).role = Box::into_raw(Box::new(role));
        (*shim).base.pMethods = &METHODS;
        rc
    }
}

unsafe extern "C" fn shim_close(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite calls this once, on a file this VFS opened; nothing uses it afterwards.
    unsafe {
        let settled = settle_if_wal(file, ResultSeen::MaybeNot);
        let shim = file.cast::<ShimFile>();
        let role = Box::from_raw((*shim).role);
        (*shim).role = ptr::null_mut();
        if let Role::Wal { name, buffer } = &*role {
            buffer.closed.store(true, Ordering::Release);
            let mut registry = lock(&REGISTRY);
            if let Some(buffers) = registry.get_mut(name) {
                buffers.retain(|other| !Arc::ptr_eq(other, buffer));
                if buffers.is_empty() {
                    registry.remove(name);
                }
            }
        }
        let (inner, methods) = inner_methods(file);
        let closed = match methods.xClose {
            Some(close) => close(inner),
            None => ffi::SQLITE_OK,
        };
        if settled != ffi::SQLITE_OK {
            settled
        } else {
            closed
        }
    }
}

unsafe extern "C" fn shim_read(
    file: *mut ffi::sqlite3_file,
    out: *mut c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    // SAFETY: SQLite's arguments, passed on.
    unsafe {
        let settled = settle_if_wal(file, ResultSeen::Always);
        if settled != ffi::SQLITE_OK {
            return ffi::SQLITE_IOERR_READ;
        }
        let (inner, methods) = inner_methods(file);
        match methods.xRead {
            Some(read) => read(inner, out, amount, offset),
            None => ffi::SQLITE_IOERR_READ,
        }
    }
}

unsafe extern "C" fn shim_write(
    file: *mut ffi::sqlite3_file,
    data: *const c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    // SAFETY: SQLite's arguments: `data` holds `amount` bytes.
    unsafe {
        let (inner, role) = parts(file);
        let Role::Wal { buffer, .. } = &*role else {
            return write_through(inner, data, amount, offset);
        };
        let Ok(length) = usize::try_from(amount) else {
            return ffi::SQLITE_IOERR_WRITE;
        };
        if length == 0 {
            return ffi::SQLITE_OK;
        }
        let bytes = std::slice::from_raw_parts(data.cast::<u8>(), length);
        buffer.writes_asked.fetch_add(1, Ordering::Relaxed);
        let mut held = lock(&buffer.held);
        if let Some(failure) = held.failure {
            return failure;
        }
        let continues = i64::try_from(held.bytes.len())
            .ok()
            .and_then(|held_length| held.offset.checked_add(held_length))
            == Some(offset);
        if offset == 0 {
            // The WAL's header: the WAL starts over (see `Held::high_water`).
            held.high_water = 0;
        }
        let appends = if held.bytes.is_empty() {
            offset >= held.high_water
        } else {
            continues
        };
        held.high_water = held
            .high_water
            .max(offset.saturating_add(i64::from(amount)));
        if !held.bytes.is_empty() && !continues {
            let rc = buffer.write_held(&mut held);
            if rc != ffi::SQLITE_OK {
                return rc;
            }
        }
        if !appends {
            // A rewrite: straight to the file, its result to SQLite. This is what keeps
            // anything from being held when a commit is published (see the module's
            // documentation).
            buffer.writes_made.fetch_add(1, Ordering::Relaxed);
            return write_through(inner, data, amount, offset);
        }
        if held.bytes.is_empty() {
            held.offset = offset;
        }
        held.bytes.extend_from_slice(bytes);
        let completes_commit = held.commit_header;
        held.commit_header = amount == FRAME_HEADER_BYTES && bytes.get(4..8) != Some(&[0; 4]);
        // Not between a commit frame's header and its page: the flush would forget the header.
        if completes_commit || (held.bytes.len() >= MAX_HELD_BYTES && !held.commit_header) {
            return buffer.write_held(&mut held);
        }
        ffi::SQLITE_OK
    }
}

unsafe extern "C" fn shim_truncate(file: *mut ffi::sqlite3_file, size: i64) -> c_int {
    // SAFETY: SQLite's arguments, passed on.
    unsafe {
        let settled = settle_if_wal(file, ResultSeen::MaybeNot);
        if settled != ffi::SQLITE_OK {
            return settled;
        }
        if let Role::Wal { buffer, .. } = &*parts(file).1 {
            let mut held = lock(&buffer.held);
            held.high_water = held.high_water.min(size);
        }
        let (inner, methods) = inner_methods(file);
        match methods.xTruncate {
            Some(truncate) => truncate(inner, size),
            None => ffi::SQLITE_IOERR_TRUNCATE,
        }
    }
}

unsafe extern "C" fn shim_sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    // SAFETY: SQLite's arguments, passed on.
    unsafe {
        let settled = settle_if_wal(file, ResultSeen::Always);
        if settled != ffi::SQLITE_OK {
            return ffi::SQLITE_IOERR_FSYNC;
        }
        let (inner, methods) = inner_methods(file);
        match methods.xSync {
            Some(sync) => sync(inner, flags),
            None => ffi::SQLITE_IOERR_FSYNC,
        }
    }
}

unsafe extern "C" fn shim_file_size(file: *mut ffi::sqlite3_file, size: *mut i64) -> c_int {
    // SAFETY: SQLite's arguments, passed on.
    unsafe {
        let settled = settle_if_wal(file, ResultSeen::MaybeNot);
        if settled != ffi::SQLITE_OK {
            return ffi::SQLITE_IOERR_FSTAT;
        }
        let (inner, methods) = inner_methods(file);
        match methods.xFileSize {
            Some(file_size) => file_size(inner, size),
            None => ffi::SQLITE_IOERR_FSTAT,
        }
    }
}

unsafe extern "C" fn shim_lock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: SQLite's arguments, passed on.
    unsafe {
        let (inner, methods) = inner_methods(file);
        match methods.xLock {
            Some(lock) => lock(inner, level),
            None => ffi::SQLITE_IOERR_LOCK,
        }
    }
}

unsafe extern "C" fn shim_unlock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: SQLite's arguments, passed on.
    unsafe {
        // In exclusive locking mode the WAL write lock is never taken in shared memory; the
        // database file's own lock is what keeps other writers out.
        write_rolled_back_frames(file);
        let (inner, methods) = inner_methods(file);
        match methods.xUnlock {
            Some(unlock) => unlock(inner, level),
            None => ffi::SQLITE_IOERR_UNLOCK,
        }
    }
}

unsafe extern "C" fn shim_check_reserved_lock(
    file: *mut ffi::sqlite3_file,
    out: *mut c_int,
) -> c_int {
    // SAFETY: SQLite's arguments, passed on.
    unsafe {
        let (inner, methods) = inner_methods(file);
        match methods.xCheckReservedLock {
            Some(check) => check(inner, out),
            None => ffi::SQLITE_IOERR_CHECKRESERVEDLOCK,
        }
    }
}

unsafe extern "C" fn shim_file_control(
    file: *mut ffi::sqlite3_file,
    op: c_int,
    argument: *mut c_void,
) -> c_int {
    // SAFETY: SQLite's arguments, passed on.
    unsafe {
        let settled = settle_if_wal(file, ResultSeen::MaybeNot);
        if settled != ffi::SQLITE_OK {
            return settled;
        }
        let (inner, methods) = inner_methods(file);
        match methods.xFileControl {
            Some(control) => control(inner, op, argument),
            None => ffi::SQLITE_NOTFOUND,
        }
    }
}

unsafe extern "C" fn shim_sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite's arguments, passed on.
    unsafe {
        let (inner, methods) = inner_methods(file);
        match methods.xSectorSize {
            Some(sector_size) => sector_size(inner),
            None => 4096,
        }
    }
}

unsafe extern "C" fn shim_device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite's arguments, passed on.
    unsafe {
        let (inner, methods) = inner_methods(file);
        match methods.xDeviceCharacteristics {
            Some(characteristics) => characteristics(inner),
            None => 0,
        }
    }
}

unsafe extern "C" fn shim_shm_map(
    file: *mut ffi::sqlite3_file,
    region: c_int,
    region_size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // SAFETY: SQLite's arguments, passed on.
    unsafe {
        let (inner, methods) = inner_methods(file);
        match methods.xShmMap {
            Some(map) => map(inner, region, region_size, extend, out),
            None => ffi::SQLITE_IOERR_SHMMAP,
        }
    }
}

unsafe extern "C" fn shim_shm_lock(
    file: *mut ffi::sqlite3_file,
    offset: c_int,
    count: c_int,
    flags: c_int,
) -> c_int {
    // SAFETY: SQLite's arguments, passed on.
    unsafe {
        // Releasing the write lock (lock 0).
        if offset == 0 && flags == ffi::SQLITE_SHM_UNLOCK | ffi::SQLITE_SHM_EXCLUSIVE {
            write_rolled_back_frames(file);
        }
        let (inner, methods) = inner_methods(file);
        match methods.xShmLock {
            Some(shm_lock) => shm_lock(inner, offset, count, flags),
            None => ffi::SQLITE_IOERR_SHMLOCK,
        }
    }
}

unsafe extern "C" fn shim_shm_barrier(file: *mut ffi::sqlite3_file) {
    // SAFETY: SQLite's arguments, passed on.
    unsafe {
        let (inner, methods) = inner_methods(file);
        if let Some(barrier) = methods.xShmBarrier {
            barrier(inner);
        }
    }
}

unsafe extern "C" fn shim_shm_unmap(file: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    // SAFETY: SQLite's arguments, passed on.
    unsafe {
        let (inner, methods) = inner_methods(file);
        match methods.xShmUnmap {
            Some(unmap) => unmap(inner, delete),
            None => ffi::SQLITE_OK,
        }
    }
}

unsafe extern "C" fn shim_fetch(
    file: *mut ffi::sqlite3_file,
    offset: i64,
    amount: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // SAFETY: SQLite's arguments, passed on; without the method there is no mapping to offer.
    unsafe {
        let settled = settle_if_wal(file, ResultSeen::Always);
        if settled != ffi::SQLITE_OK {
            return settled;
        }
        let (inner, methods) = inner_methods(file);
        match methods.xFetch {
            Some(fetch) if methods.iVersion >= 3 => fetch(inner, offset, amount, out),
            _ => {
                *out = ptr::null_mut();
                ffi::SQLITE_OK
            }
        }
    }
}

unsafe extern "C" fn shim_unfetch(
    file: *mut ffi::sqlite3_file,
    offset: i64,
    page: *mut c_void,
) -> c_int {
    // SAFETY: SQLite's arguments, passed on.
    unsafe {
        let (inner, methods) = inner_methods(file);
        match methods.xUnfetch {
            Some(unfetch) if methods.iVersion >= 3 => unfetch(inner, offset, page),
            _ => ffi::SQLITE_OK,
        }
    }
}

static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(shim_close),
    xRead: Some(shim_read),
    xWrite: Some(shim_write),
    xTruncate: Some(shim_truncate),
    xSync: Some(shim_sync),
    xFileSize: Some(shim_file_size),
    xLock: Some(shim_lock),
    xUnlock: Some(shim_unlock),
    xCheckReservedLock: Some(shim_check_reserved_lock),
    xFileControl: Some(shim_file_control),
    xSectorSize: Some(shim_sector_size),
    xDeviceCharacteristics: Some(shim_device_characteristics),
    xShmMap: Some(shim_shm_map),
    xShmLock: Some(shim_shm_lock),
    xShmBarrier: Some(shim_shm_barrier),
    xShmUnmap: Some(shim_shm_unmap),
    xFetch: Some(shim_fetch),
    xUnfetch: Some(shim_unfetch),
};

#[cfg(test)]
mod tests {
    use std::path::Path;

    use rusqlite::{Connection, OpenFlags, params};

    use super::*;

    fn open_through_shim(path: &Path) -> Connection {
        let vfs = register().expect("register the VFS");
        let connection = Connection::open_with_flags_and_vfs(path, OpenFlags::default(), vfs)
            .expect("open through the VFS");
        connection
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = NORMAL;
                 PRAGMA wal_autocheckpoint = 0;
                 CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY, value INTEGER, data BLOB);",
            )
            .expect("set up");
        connection
    }

    fn wal_name(connection: &Connection) -> Vec<u8> {
        super::wal_name(connection).expect("database name")
    }

    /// (rows, sum of values, sum of data lengths), the content every check compares.
    fn content(connection: &Connection) -> (i64, i64, i64) {
        connection
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(value), 0), COALESCE(SUM(length(data)), 0) FROM rows",
                [],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )
            .expect("content")
    }

    fn insert(connection: &Connection, from: i64, count: i64, value: i64) {
        let mut statement = connection
            .prepare_cached("INSERT INTO rows (id, value, data) VALUES (?1, ?2, randomblob(1000))")
            .expect("prepare");
        for id in from..from + count {
            statement.execute(params![id, value]).expect("insert");
        }
    }

    #[test]
    fn a_transactions_frames_reach_the_wal_in_a_few_writes() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("gather.sqlite3");
        let connection = open_through_shim(&path);
        let wal = wal_name(&connection);
        let (asked_before, made_before) = write_counts(&wal).expect("the WAL is registered");

        connection.execute_batch("BEGIN").expect("begin");
        insert(&connection, 1, 200, 1);
        connection.execute_batch("COMMIT").expect("commit");

        let (asked, made) = write_counts(&wal).expect("the WAL is registered");
        let (asked, made) = (asked - asked_before, made - made_before);
        // 200 rows of 1 KB fill about 60 pages: two write calls each from SQLite.
        assert!(asked >= 100, "SQLite asked for {asked} writes");
        assert!(
            made <= 2,
            "{made} writes reached the file for {asked} asked"
        );

        // Another connection, through the default VFS, reads the commit at once.
        let reader = Connection::open(&path).expect("reader");
        assert_eq!(content(&reader), (200, 200, 200_000));
    }

    /// A copy of the database and its WAL taken while the writer is open, as a crash leaves
    /// them, recovers exactly the committed transactions: every frame reached the file, at
    /// its place, with its checksum. The writer's cache is tiny, so transactions spill frames
    /// before their commit, rewrite spilled pages in place, and rewrite frame checksums.
    #[test]
    fn what_a_crash_leaves_holds_every_commit() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("crash.sqlite3");
        let connection = open_through_shim(&path);
        connection
            .execute_batch("PRAGMA cache_size = 8;")
            .expect("small cache");
        let wal = wal_name(&connection);

        connection.execute_batch("BEGIN").expect("begin");
        insert(&connection, 1, 300, 1);
        connection
            .execute("UPDATE rows SET value = 2 WHERE id % 2 = 0", [])
            .expect("update");
        connection.execute_batch("COMMIT").expect("commit");
        // It rewrote spilled pages and frame checksums: nothing may be held once committed.
        assert_eq!(held_bytes(&wal), Some(0), "bytes held after a commit");
        // Spills and then rolls back: none of it may survive.
        connection.execute_batch("BEGIN").expect("begin");
        insert(&connection, 10_000, 300, 7);
        connection.execute_batch("ROLLBACK").expect("rollback");
        // The copy is taken right after the last of these commits.
        for round in 0..20 {
            connection.execute_batch("BEGIN").expect("begin");
            insert(&connection, 1_000 + round * 5, 5, 3);
            connection.execute_batch("COMMIT").expect("commit");
            assert_eq!(held_bytes(&wal), Some(0), "bytes held after a commit");
        }
        let copy = dir.path().join("copy");
        std::fs::create_dir(&copy).expect("copy directory");
        std::fs::copy(&path, copy.join("crash.sqlite3")).expect("copy the database");
        let mut wal = path.clone().into_os_string();
        wal.push("-wal");
        std::fs::copy(&wal, copy.join("crash.sqlite3-wal")).expect("copy the WAL");
        // Only now: reading pages back through the writer writes what the shim holds.
        let committed = content(&connection);
        assert_eq!(committed, (400, 150 + 300 + 300, 400_000));

        let recovered = Connection::open(copy.join("crash.sqlite3")).expect("open the copy");
        let check: String = recovered
            .query_row("PRAGMA integrity_check", [], |row| row.get(0))
            .expect("integrity check");
        assert_eq!(check, "ok");
        assert_eq!(content(&recovered), committed);
        drop(connection);
    }

    #[test]
    fn a_wal_is_forgotten_when_it_closes() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("close.sqlite3");
        let connection = open_through_shim(&path);
        let wal = wal_name(&connection);
        assert!(write_counts(&wal).is_some());
        drop(connection);
        assert!(write_counts(&wal).is_none());
        assert_eq!(deferred_write_failure(&wal), None);
    }

    /// Failing writes, injected through the unix VFS's replaceable system calls for one file
    /// only (matched by name through /proc), so that other tests running meanwhile are not
    /// touched.
    #[cfg(target_os = "linux")]
    mod injected {
        use std::ffi::{c_int, c_void};
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::{Mutex, OnceLock};

        use rusqlite::ffi;

        type Pwrite = unsafe extern "C" fn(c_int, *const c_void, usize, i64) -> isize;

        static REAL_PWRITE: OnceLock<Option<Pwrite>> = OnceLock::new();
        static ARMED: AtomicBool = AtomicBool::new(false);
        static FIRED: AtomicUsize = AtomicUsize::new(0);
        /// Which of a file's writes fails.
        type Fails = fn(&[u8]) -> bool;

        /// The file name the armed failure is for, and which write of it fails.
        static TARGET: Mutex<Option<(String, Fails)>> = Mutex::new(None);
        /// The injection is process-wide: its tests run one at a time.
        pub static SERIAL: Mutex<()> = Mutex::new(());

        /// A pwrite that writes nothing (SQLite reports `SQLITE_FULL`) when armed and the write
        /// is the target's.
        unsafe extern "C" fn pwrite_or_fail(
            fd: c_int,
            data: *const c_void,
            length: usize,
            offset: i64,
        ) -> isize {
            if ARMED.load(Ordering::SeqCst) {
                // SAFETY: SQLite's arguments: `data` holds `length` bytes.
                let bytes = unsafe { std::slice::from_raw_parts(data.cast::<u8>(), length) };
                let target = super::super::lock(&TARGET).clone();
                if let Some((name, fails)) = target
                    && fails(bytes)
                    && std::fs::read_link(format!("/proc/self/fd/{fd}"))
                        .is_ok_and(|path| path.to_string_lossy().ends_with(&name))
                {
                    ARMED.store(false, Ordering::SeqCst);
                    FIRED.fetch_add(1, Ordering::SeqCst);
                    return 0;
                }
            }
            match REAL_PWRITE.get() {
                // SAFETY: the default VFS's own pwrite, with SQLite's arguments.
                Some(Some(real)) => unsafe { real(fd, data, length, offset) },
                _ => -1,
            }
        }

        /// Arms one failing write of the file whose name ends with `name`.
        pub fn arm(name: &str, fails: Fails) {
            REAL_PWRITE.get_or_init(|| {
                // SAFETY: the default VFS's system-call table, as SQLite documents it
                // (`xSetSystemCall`); the replacement has pwrite's signature.
                unsafe {
                    ffi::sqlite3_initialize();
                    let vfs = ffi::sqlite3_vfs_find(std::ptr::null());
                    let (get, set) = ((*vfs).xGetSystemCall?, (*vfs).xSetSystemCall?);
                    let real = get(vfs, c"pwrite".as_ptr())?;
                    let replacement: Pwrite = pwrite_or_fail;
                    let replacement =
                        std::mem::transmute::<Pwrite, unsafe extern "C" fn()>(replacement);
                    if set(vfs, c"pwrite".as_ptr(), Some(replacement)) != ffi::SQLITE_OK {
                        return None;
                    }
                    Some(std::mem::transmute::<unsafe extern "C" fn(), Pwrite>(real))
                }
            });
            assert!(
                matches!(REAL_PWRITE.get(), Some(Some(_))),
                "cannot replace the default VFS's pwrite"
            );
            *super::super::lock(&TARGET) = Some((name.to_string(), fails));
            FIRED.store(0, Ordering::SeqCst);
            ARMED.store(true, Ordering::SeqCst);
        }

        /// Disarms; returns how many writes failed.
        pub fn disarm() -> usize {
            ARMED.store(false, Ordering::SeqCst);
            *super::super::lock(&TARGET) = None;
            FIRED.load(Ordering::SeqCst)
        }
    }

    /// Opens a copy of the database and its WAL, as a crash would leave them, and returns its
    /// content after an integrity check.
    fn recovered_content(path: &Path, copy: &Path) -> (i64, i64, i64) {
        std::fs::create_dir(copy).expect("copy directory");
        let name = path.file_name().expect("file name");
        std::fs::copy(path, copy.join(name)).expect("copy the database");
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        let mut wal_copy = copy.join(name).into_os_string();
        wal_copy.push("-wal");
        std::fs::copy(&wal, &wal_copy).expect("copy the WAL");
        let recovered = Connection::open(copy.join(name)).expect("open the copy");
        let check: String = recovered
            .query_row("PRAGMA integrity_check", [], |row| row.get(0))
            .expect("integrity check");
        assert_eq!(check, "ok");
        content(&recovered)
    }

    /// A failing write of what the shim gathered fails the COMMIT, as it would without the
    /// shim: nothing of the transaction is visible or recovered, and the WAL goes on working.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_failed_write_of_a_commits_frames_fails_the_commit() {
        let _serial = lock(&injected::SERIAL);
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("inject-gathered.sqlite3");
        let connection = open_through_shim(&path);
        insert(&connection, 1, 10, 1);
        let before = content(&connection);

        injected::arm("inject-gathered.sqlite3-wal", |bytes| bytes.len() > 4096);
        connection.execute_batch("BEGIN").expect("begin");
        insert(&connection, 100, 100, 2);
        let commit = connection.execute_batch("COMMIT");
        assert_eq!(
            injected::disarm(),
            1,
            "the gathered write was not attempted"
        );
        assert!(
            commit.is_err(),
            "the commit succeeded although its frames were not written"
        );
        let _ = connection.execute_batch("ROLLBACK");
        assert_eq!(content(&connection), before);
        assert_eq!(deferred_write_failure(&wal_name(&connection)), None);

        insert(&connection, 500, 5, 3);
        let after = content(&connection);
        assert_eq!(after, (15, 25, 15_000));
        assert_eq!(recovered_content(&path, &dir.path().join("copy")), after);
    }

    /// A transaction that spilled pages and wrote them again makes SQLite rewrite frame
    /// checksums after the commit frame; the last rewrite is the commit frame's header. Its
    /// failure fails the COMMIT too, instead of surfacing only after the commit is published.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_failed_rewrite_of_a_frame_checksum_fails_the_commit() {
        let _serial = lock(&injected::SERIAL);
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("inject-rewrite.sqlite3");
        let connection = open_through_shim(&path);
        connection
            .execute_batch("PRAGMA cache_size = 8;")
            .expect("small cache");
        insert(&connection, 1, 10, 1);
        let before = content(&connection);

        // A 24-byte frame header carrying a database size: a commit frame's.
        injected::arm("inject-rewrite.sqlite3-wal", |bytes| {
            bytes.len() == 24 && bytes.get(4..8) != Some(&[0; 4])
        });
        connection.execute_batch("BEGIN").expect("begin");
        insert(&connection, 100, 300, 2);
        connection
            .execute("UPDATE rows SET value = 4 WHERE id % 2 = 0", [])
            .expect("update");
        let commit = connection.execute_batch("COMMIT");
        assert_eq!(injected::disarm(), 1, "no checksum was rewritten");
        assert!(
            commit.is_err(),
            "the commit succeeded although its header was not written"
        );
        let _ = connection.execute_batch("ROLLBACK");
        assert_eq!(content(&connection), before);
        assert_eq!(deferred_write_failure(&wal_name(&connection)), None);
        assert_eq!(recovered_content(&path, &dir.path().join("copy")), before);
    }

    /// A transaction that spilled frames and rolled back leaves nothing held once its write lock
    /// is released, so another writer's commit at the same offsets is never overwritten.
    #[test]
    fn frames_of_a_rolled_back_transaction_never_overwrite_another_writers_commit() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("rollback.sqlite3");
        let writer = open_through_shim(&path);
        writer
            .execute_batch("PRAGMA cache_size = 8;")
            .expect("small cache");
        let wal = wal_name(&writer);
        insert(&writer, 1, 10, 1);
        // Everything copied into the database file: the rollback reads nothing from the WAL.
        writer
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
            .expect("checkpoint");

        writer.execute_batch("BEGIN").expect("begin");
        insert(&writer, 10_000, 300, 7);
        writer.execute_batch("ROLLBACK").expect("rollback");
        assert_eq!(held_bytes(&wal), Some(0), "bytes held after the rollback");

        let other = Connection::open(&path).expect("another writer");
        other.execute_batch("BEGIN").expect("begin");
        insert(&other, 100, 20, 2);
        other.execute_batch("COMMIT").expect("commit");

        let expected = (30, 50, 30_000);
        assert_eq!(content(&writer), expected);
        assert_eq!(content(&other), expected);
        assert_eq!(recovered_content(&path, &dir.path().join("copy")), expected);
    }
}
