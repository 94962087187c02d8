//! Stops MLX 0.32's CUDA completion worker from holding a core for as long as the process
//! lives (ml-explore/mlx#4451, fixed upstream by #4452 after the 0.32.2 that mlxd is pinned to).
//!
//! That thread (`cu::Worker::thread_fn`) resets the batch it has seen to 0 on every turn of its
//! loop, so once the first completion has run, its condition-variable wait never blocks: it
//! locks its mutex, finds nothing new, unlocks and locks again, millions of times a second,
//! idle or not. An idle daemon then shows 100% of one core in `top`, and while decoding the
//! spinning thread takes that mutex from the thread that commits each graph.
//!
//! mlxd cannot patch the prebuilt library, so on Linux x86_64 its executables define
//! `pthread_mutex_lock` (the dynamic linker binds every library's calls to the executable's
//! definition first) and pass each call on to the C library's. Before passing it on, a thread
//! that has locked the *same* mutex [`STREAK`] times in a row, each within [`GAP_TICKS`] of
//! the lock before (a loop that does nothing else: no thread doing work locks one mutex a
//! million times a second and no other), sleeps first: 50 µs for its first [`SHORT_SLEEPS`]
//! sleeps, then 1 ms while it keeps to that one mutex. It never sleeps holding a lock (the
//! sleep comes before the lock), and it is back to full speed at the first lock of another
//! mutex, which MLX's worker takes as soon as it has completions to run (freeing buffers).
//! Every other thread pays a thread-local comparison and a time-stamp read per lock.
//!
//! Off until [`install`] (the binaries call it first thing; tests that link the library do not),
//! and off with `MLXD_SPIN_GUARD=0`. Elsewhere (macOS's Metal backend has no such worker,
//! Linux on other CPUs) [`install`] does nothing.

/// Whether [`install`] found the guard on for this process.
pub fn active() -> bool {
    imp::active()
}

/// Turns the guard on unless `MLXD_SPIN_GUARD=0`; call before MLX starts any thread.
pub fn install() {
    imp::install()
}

/// Consecutive locks of one mutex, each soon after the last, before a thread counts as spinning.
pub const STREAK: u32 = 2_000;
/// "Soon": time-stamp-counter ticks between two locks (about 1-2 µs at 2-4 GHz; a spinning
/// turn of MLX's worker takes well under 0.2 µs).
pub const GAP_TICKS: u64 = 4_000;
/// Sleeps of 50 µs before a spinning thread's sleeps lengthen to 1 ms.
pub const SHORT_SLEEPS: u32 = 20;

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod imp {
    use super::{GAP_TICKS, SHORT_SLEEPS, STREAK};
    use std::cell::Cell;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    static ON: AtomicBool = AtomicBool::new(false);
    /// The C library's `pthread_mutex_lock`, found on first use.
    static REAL: AtomicUsize = AtomicUsize::new(0);

    thread_local! {
        static LAST: Cell<usize> = const { Cell::new(0) };
        static LAST_TICK: Cell<u64> = const { Cell::new(0) };
        static STREAK_N: Cell<u32> = const { Cell::new(0) };
        static SLEEPS: Cell<u32> = const { Cell::new(0) };
    }

    type Lock = unsafe extern "C" fn(*mut libc::pthread_mutex_t) -> libc::c_int;

    pub fn active() -> bool {
        ON.load(Ordering::Relaxed)
    }

    pub fn install() {
        // Referencing the interposer keeps it in the executable (and so in its dynamic symbol
        // table, where libmlx.so's calls resolve to it).
        std::hint::black_box(pthread_mutex_lock as Lock);
        let on = std::env::var("MLXD_SPIN_GUARD").map_or(true, |v| v != "0");
        ON.store(on && real().is_some(), Ordering::Relaxed);
    }

    fn real() -> Option<Lock> {
        let mut f = REAL.load(Ordering::Acquire);
        if f == 0 {
            // SAFETY: a symbol lookup by a NUL-terminated name; glibc's own locking inside
            // dlsym does not go through this symbol.
            f = unsafe { libc::dlsym(libc::RTLD_NEXT, c"pthread_mutex_lock".as_ptr()) } as usize;
            REAL.store(f, Ordering::Release);
        }
        // SAFETY: a non-null result of that lookup is the C library's function of this type.
        (f != 0).then(|| unsafe { std::mem::transmute::<usize, Lock>(f) })
    }

    fn sleep_us(us: i64) {
        let t = libc::timespec { tv_sec: 0, tv_nsec: us * 1_000 };
        // SAFETY: a plain sleep; an interruption just ends it early.
        unsafe { libc::nanosleep(&t, std::ptr::null_mut()) };
    }

    /// Sleeps first when this thread is spinning on `m` (see the module header).
    fn before_lock(m: usize) {
        // SAFETY: reads the time-stamp counter (every x86_64 CPU has it).
        let now = unsafe { std::arch::x86_64::_rdtsc() };
        let (last, tick) = (LAST.replace(m), LAST_TICK.replace(now));
        if last != m {
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
        let streak = if now.wrapping_sub(tick) < GAP_TICKS { STREAK_N.get() + 1 } else { 0 };
        STREAK_N.set(streak);
        if streak >= STREAK {
            SLEEPS.set(1);
            sleep_us(50);
        }
    }

    /// The interposer: the guard's check, then the C library's lock.
    ///
    /// # Safety
    /// As `pthread_mutex_lock(3)`.
    #[no_mangle]
    pub unsafe extern "C" fn pthread_mutex_lock(m: *mut libc::pthread_mutex_t) -> libc::c_int {
        if ON.load(Ordering::Relaxed) {
            before_lock(m as usize);
        }
        match real() {
            // SAFETY: the caller's contract, passed on.
            Some(lock) => unsafe { lock(m) },
            None => libc::EINVAL,
        }
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

    /// Turns in 200 ms of a thread that locks and unlocks `mutexes` in turn, as fast as it can.
    fn turns(mutexes: Vec<Arc<Raw>>) -> u64 {
        let (stop, n) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (s, c) = (stop.clone(), n.clone());
        let t = std::thread::spawn(move || {
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
    fn a_thread_spinning_on_one_mutex_is_slowed_and_one_that_alternates_is_not() {
        std::env::remove_var("MLXD_SPIN_GUARD");
        super::install();
        assert!(super::active());
        let (a, b) = (Arc::new(Raw::new()), Arc::new(Raw::new()));
        // Alone on one mutex: the first 2,000 turns at full speed, then 50 µs sleeps (at most
        // ~20,000 a second), then 1 ms ones.
        let spinning = turns(vec![a.clone()]);
        assert!(spinning < 12_000, "a spinning thread turned {spinning} times in 200 ms");
        // Two mutexes in turn (a thread doing other work between its locks): never slowed.
        let working = turns(vec![a, b]);
        assert!(working > 50_000, "a thread alternating two mutexes turned only {working} times in 200 ms");
    }
}
