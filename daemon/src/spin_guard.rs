//! Keeps MLX 0.32's CUDA completion worker from holding a core for as long as the process lives
//! (ml-explore/mlx#4451, fixed upstream after the 0.32.2 that mlxd is pinned to).
//!
//! That thread (`cu::Worker::thread_fn`) resets the batch it has seen to 0 on every turn of its
//! loop, so once the first completion has run, its condition-variable wait never blocks: it
//! locks its mutex, finds nothing new, unlocks and locks again, millions of times a second,
//! idle or not. An idle daemon then shows 100% of one core in `top`.
//!
//! mlxd cannot patch the prebuilt library, so on Linux x86_64 its executables define
//! `pthread_create` and `pthread_mutex_lock` (the dynamic linker binds every library's calls to
//! the executable's definitions first) and pass each call on to the C library's.
//! - `pthread_create` recognizes MLX's worker by what `std::thread` hands the C library: a
//!   start routine inside libstdc++ and a state object whose virtual table is the one libmlx.so
//!   exports for a thread running `cu::Worker`'s member function. That thread, and only that
//!   one, starts through a trampoline that marks it.
//! - `pthread_mutex_lock`, on the marked thread only: when it has locked the *same* mutex
//!   [`STREAK`] times in a row (the idle loop, for a few milliseconds: whenever it has
//!   completions to run it frees buffers and counts tasks, under other mutexes), it sleeps
//!   before its next lock, 50 µs for its first [`SHORT_SLEEPS`] sleeps and 1 ms after that,
//!   until it locks another mutex. It never sleeps holding a lock. A
//!   completion that arrives while it sleeps waits at most 1 ms (MLX's evaluation waits for
//!   completions only beyond 10 graphs in flight; a new request's first step may wait once).
//!
//! Session 12 tried the same sleep on *every* thread that spun so on one mutex; on an H100 a
//! process then hung (some other thread must keep polling), hence the worker-only rule.
//!
//! Off until [`install`] (the binaries call it first thing; tests that link the library do not),
//! and off with `MLXD_SPIN_GUARD=0`; inactive where libmlx.so has no CUDA worker (the CPU and
//! Metal builds); it does nothing on other systems than Linux x86_64.

/// Whether [`install`] found the guard on and MLX's CUDA worker in this process's libraries.
pub fn active() -> bool {
    imp::active()
}

/// Turns the guard on unless `MLXD_SPIN_GUARD=0`; call before MLX starts any thread.
pub fn install() {
    imp::install()
}

/// Consecutive locks of one mutex (and no other) before the worker counts as idle: a few
/// milliseconds without a completion at the 0.1-0.2 µs an idle turn takes, longer than the gaps
/// between a decoding step's completions (on an H100, MLX commits a graph every 100 nodes: ~7
/// a step, ~0.4 ms apart), so the worker sleeps only when the process has nothing on the GPU.
/// Time between the locks does not count: a busy host preempts the spinning thread often, and
/// that is when its core matters most.
pub const STREAK: u32 = 20_000;
/// Sleeps of 50 µs before an idle worker's sleeps lengthen to 1 ms.
pub const SHORT_SLEEPS: u32 = 20;

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod imp {
    use super::{SHORT_SLEEPS, STREAK};
    use std::cell::Cell;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    static ON: AtomicBool = AtomicBool::new(false);
    /// The address MLX's worker thread state's virtual-table pointer holds (0: none here).
    static WORKER_VPTR: AtomicUsize = AtomicUsize::new(0);
    /// The C library's functions, found on first use.
    static REAL_LOCK: AtomicUsize = AtomicUsize::new(0);
    static REAL_CREATE: AtomicUsize = AtomicUsize::new(0);

    /// `std::thread`'s state object for a thread running `mlx::core::cu::Worker`'s member
    /// function with a `shared_ptr<Worker>`: its virtual table, as libmlx.so (CUDA) exports it.
    const WORKER_VTABLE: &std::ffi::CStr =
        c"_ZTVNSt6thread11_State_implINS_8_InvokerISt5tupleIJMN3mlx4core2cu6WorkerEFvvESt10shared_ptrIS6_EEEEEEE";

    thread_local! {
        static MARKED: Cell<bool> = const { Cell::new(false) };
        static LAST: Cell<usize> = const { Cell::new(0) };
        static STREAK_N: Cell<u32> = const { Cell::new(0) };
        static SLEEPS: Cell<u32> = const { Cell::new(0) };
    }

    type Lock = unsafe extern "C" fn(*mut libc::pthread_mutex_t) -> libc::c_int;
    type Start = extern "C" fn(*mut libc::c_void) -> *mut libc::c_void;
    type Create = unsafe extern "C" fn(
        *mut libc::pthread_t,
        *const libc::pthread_attr_t,
        Start,
        *mut libc::c_void,
    ) -> libc::c_int;

    pub fn active() -> bool {
        ON.load(Ordering::Relaxed) && WORKER_VPTR.load(Ordering::Relaxed) != 0
    }

    pub fn install() {
        // Referencing the interposers keeps them in the executable (and so in its dynamic
        // symbol table, where libmlx.so's calls resolve to them).
        std::hint::black_box((pthread_mutex_lock as Lock, pthread_create as Create));
        // SAFETY: a symbol lookup by a NUL-terminated name.
        let vtable = unsafe { libc::dlsym(libc::RTLD_DEFAULT, WORKER_VTABLE.as_ptr()) } as usize;
        // An object's virtual-table pointer holds the table's address past its offset-to-top
        // and type-info words (the Itanium C++ ABI, as GCC lays it out).
        WORKER_VPTR.store(if vtable == 0 { 0 } else { vtable + 16 }, Ordering::Relaxed);
        let on = std::env::var("MLXD_SPIN_GUARD").map_or(true, |v| v != "0");
        ON.store(on && real_lock().is_some() && real_create().is_some(), Ordering::Relaxed);
    }

    fn lookup(cache: &AtomicUsize, name: &std::ffi::CStr) -> usize {
        let mut f = cache.load(Ordering::Acquire);
        if f == 0 {
            // SAFETY: a symbol lookup by a NUL-terminated name; glibc's own locking inside
            // dlsym does not go through these symbols.
            f = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) } as usize;
            cache.store(f, Ordering::Release);
        }
        f
    }

    fn real_lock() -> Option<Lock> {
        let f = lookup(&REAL_LOCK, c"pthread_mutex_lock");
        // SAFETY: a non-null result of that lookup is the C library's function of this type.
        (f != 0).then(|| unsafe { std::mem::transmute::<usize, Lock>(f) })
    }

    fn real_create() -> Option<Create> {
        let f = lookup(&REAL_CREATE, c"pthread_create");
        // SAFETY: as above.
        (f != 0).then(|| unsafe { std::mem::transmute::<usize, Create>(f) })
    }

    /// Whether `start(arg)` is `std::thread` starting MLX's CUDA worker.
    fn is_mlx_worker(start: Start, arg: *mut libc::c_void) -> bool {
        let vptr = WORKER_VPTR.load(Ordering::Relaxed);
        if vptr == 0 || arg.is_null() {
            return false;
        }
        // Only `std::thread`'s own start routine (in libstdc++) gets a state object, whose first
        // word may then be read; any other routine's argument could be anything.
        let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
        // SAFETY: dladdr reads the loader's tables for an address and fills `info`.
        if unsafe { libc::dladdr(start as *const libc::c_void, &mut info) } == 0 || info.dli_fname.is_null() {
            return false;
        }
        // SAFETY: a NUL-terminated path the loader owns.
        let file = unsafe { std::ffi::CStr::from_ptr(info.dli_fname) }.to_bytes();
        if !file.windows(9).any(|w| w == b"libstdc++") {
            return false;
        }
        // SAFETY: libstdc++ passes `std::thread::_State*`, a polymorphic object.
        unsafe { *(arg as *const usize) == vptr }
    }

    /// What the worker's trampoline runs: the original routine and its argument.
    struct Marked {
        start: Start,
        arg: *mut libc::c_void,
    }

    extern "C" fn trampoline(p: *mut libc::c_void) -> *mut libc::c_void {
        // SAFETY: made by `pthread_create` below from a Box, taken back exactly once here.
        let m = unsafe { Box::from_raw(p as *mut Marked) };
        MARKED.with(|c| c.set(true));
        (m.start)(m.arg)
    }

    /// Marks the calling thread as MLX's worker (tests).
    #[cfg(test)]
    pub fn mark_this_thread() {
        MARKED.with(|c| c.set(true));
    }

    fn sleep_us(us: i64) {
        let t = libc::timespec { tv_sec: 0, tv_nsec: us * 1_000 };
        // SAFETY: a plain sleep; an interruption just ends it early.
        unsafe { libc::nanosleep(&t, std::ptr::null_mut()) };
    }

    /// Sleeps first when the worker is idling on `m` (see the module header).
    fn before_lock(m: usize) {
        if LAST.replace(m) != m {
            STREAK_N.set(0);
            SLEEPS.set(0);
            return;
        }
        let sleeps = SLEEPS.get();
        if sleeps > 0 {
            SLEEPS.set(sleeps.saturating_add(1));
            sleep_us(if sleeps < SHORT_SLEEPS { 50 } else { 1_000 });
            return;
        }
        let streak = STREAK_N.get() + 1;
        STREAK_N.set(streak);
        if streak >= STREAK {
            SLEEPS.set(1);
            sleep_us(50);
        }
    }

    /// The lock interposer: the guard's check on the marked thread, then the C library's lock.
    ///
    /// # Safety
    /// As `pthread_mutex_lock(3)`.
    #[no_mangle]
    pub unsafe extern "C" fn pthread_mutex_lock(m: *mut libc::pthread_mutex_t) -> libc::c_int {
        if MARKED.with(Cell::get) && ON.load(Ordering::Relaxed) {
            before_lock(m as usize);
        }
        match real_lock() {
            // SAFETY: the caller's contract, passed on.
            Some(lock) => unsafe { lock(m) },
            None => libc::EINVAL,
        }
    }

    /// The thread-creation interposer: MLX's worker starts through [`trampoline`], every other
    /// thread as asked.
    ///
    /// # Safety
    /// As `pthread_create(3)`.
    #[no_mangle]
    pub unsafe extern "C" fn pthread_create(
        thread: *mut libc::pthread_t,
        attr: *const libc::pthread_attr_t,
        start: Start,
        arg: *mut libc::c_void,
    ) -> libc::c_int {
        let Some(create) = real_create() else {
            return libc::EAGAIN;
        };
        if ON.load(Ordering::Relaxed) && is_mlx_worker(start, arg) {
            let marked = Box::into_raw(Box::new(Marked { start, arg }));
            // SAFETY: the caller's contract, with our routine and its boxed argument.
            let rc = unsafe { create(thread, attr, trampoline, marked as *mut libc::c_void) };
            if rc != 0 {
                // SAFETY: the thread was not created, so nothing else took the box.
                drop(unsafe { Box::from_raw(marked) });
            }
            return rc;
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { create(thread, attr, start, arg) }
    }
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
mod imp {
    pub fn active() -> bool {
        false
    }
    pub fn install() {}
}

#[cfg(all(test, target_os = "linux", target_arch = "x86_64"))]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// A pthread mutex that `lock` takes through the process's `pthread_mutex_lock` symbol.
    struct Raw(std::cell::UnsafeCell<libc::pthread_mutex_t>);
    unsafe impl Sync for Raw {}
    unsafe impl Send for Raw {}
    impl Raw {
        fn new() -> Self {
            Raw(std::cell::UnsafeCell::new(libc::PTHREAD_MUTEX_INITIALIZER))
        }
        fn lock_unlock(&self) {
            // SAFETY: an initialized mutex, locked then unlocked by this thread.
            unsafe {
                super::imp::pthread_mutex_lock(self.0.get());
                libc::pthread_mutex_unlock(self.0.get());
            }
        }
    }

    /// Turns in 200 ms of a thread (marked as MLX's worker when `marked`) that locks and
    /// unlocks `mutexes` in turn, as fast as it can.
    fn turns(mutexes: Vec<Arc<Raw>>, marked: bool) -> u64 {
        let (stop, n) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (s, c) = (stop.clone(), n.clone());
        let t = std::thread::spawn(move || {
            if marked {
                super::imp::mark_this_thread();
            }
            while !s.load(Ordering::Relaxed) {
                for m in &mutexes {
                    m.lock_unlock();
                }
                c.fetch_add(1, Ordering::Relaxed);
            }
        });
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
        n.load(Ordering::Relaxed)
    }

    #[test]
    fn only_the_marked_worker_is_slowed_and_only_while_it_idles_on_one_mutex() {
        std::env::remove_var("MLXD_SPIN_GUARD");
        super::install();
        // No CUDA worker in the CPU build of libmlx.so: the guard stays inactive, but its
        // interposers run (threads start through the one, locks through the other).
        assert!(!super::active());
        let (a, b) = (Arc::new(Raw::new()), Arc::new(Raw::new()));
        // The worker alone on one mutex: the first STREAK turns at full speed, then 50 µs sleeps
        // (at most ~20,000 a second), then 1 ms ones.
        let idle = turns(vec![a.clone()], true);
        assert!(idle < super::STREAK as u64 + 12_000, "the idle worker turned {idle} times in 200 ms");
        // The worker taking two mutexes in turn (running completions): never slowed.
        let working = turns(vec![a.clone(), b], true);
        assert!(working > 100_000, "the working worker turned only {working} times in 200 ms");
        // Any other thread, spinning on one mutex: never slowed.
        let other = turns(vec![a], false);
        assert!(other > 100_000, "an unmarked thread turned only {other} times in 200 ms");
    }
}
