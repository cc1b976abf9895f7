//! Values boxed where they are built. `Box::pin(value)` builds the value
//! on the stack and copies all of it to the heap, and a future's size is
//! that of its largest state however little its unstarted one holds: a
//! request's future is kilobytes, of which it starts with a few words.
//! Built by `make` straight into an allocated box, only those words are
//! written: the compiler does so when it sees the box allocated before
//! `make` runs, so this is always inlined.

use std::pin::Pin;

#[inline(always)]
#[allow(unsafe_code)]
pub fn built<T>(make: impl FnOnce() -> T) -> Box<T> {
    let mut slot = Box::<T>::new_uninit();
    slot.write(make());
    // SAFETY: `write` initialised the box; if `make` panics, the box is
    // freed uninitialised, and nothing in it is dropped.
    unsafe { slot.assume_init() }
}

/// [`built`], pinned: a future.
#[inline(always)]
pub fn pinned<T>(make: impl FnOnce() -> T) -> Pin<Box<T>> {
    Box::into_pin(built(make))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    struct Counted(Arc<AtomicUsize>);

    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[tokio::test]
    async fn a_future_boxed_in_place_runs_and_drops_once() {
        let drops = Arc::new(AtomicUsize::new(0));
        let held = Counted(drops.clone());
        let future = pinned(|| async move {
            tokio::task::yield_now().await;
            let big = [7u8; 4096];
            tokio::task::yield_now().await;
            drop(held);
            big.iter().map(|&b| u64::from(b)).sum::<u64>()
        });
        assert_eq!(future.await, 7 * 4096);
        assert_eq!(drops.load(Ordering::Relaxed), 1);

        let unstarted = pinned(|| {
            let held = Counted(drops.clone());
            async move { drop(held) }
        });
        drop(unstarted);
        assert_eq!(
            drops.load(Ordering::Relaxed),
            2,
            "dropped unstarted, its captures go too"
        );

        let held = Counted(drops.clone());
        let failed = std::panic::catch_unwind(move || {
            built(move || -> Counted {
                drop(held);
                panic!("made nothing")
            })
        });
        assert!(failed.is_err());
        assert_eq!(
            drops.load(Ordering::Relaxed),
            3,
            "a box left unmade drops nothing more"
        );
    }
}
