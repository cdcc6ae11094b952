//! Buffer pools: the frame runtime's answer to "no per-frame allocation".
//!
//! A [`BufferPool`] hands out [`PooledBuffer`]s. When the last reference to a buffer goes away (the
//! last sink has seen the frame, or a queue dropped it) the memory returns to its pool instead of
//! the allocator, so a pipeline in steady state allocates nothing: the pool grows to the number of
//! frames in flight (bounded by the queue capacities) and then stays flat. The pool counts every
//! fresh allocation so that tests and benchmarks can prove it.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A pool of reusable `Vec<T>` buffers. Cloning the pool is cheap (it is an `Arc`).
pub struct BufferPool<T: Copy + Default + Send + 'static> {
    inner: Arc<PoolInner<T>>,
}

impl<T: Copy + Default + Send + 'static> Clone for BufferPool<T> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

struct PoolInner<T> {
    free: Mutex<Vec<Vec<T>>>,
    /// Buffers kept for reuse at most; extra returned buffers are freed.
    max_free: usize,
    allocations: AtomicU64,
    reuses: AtomicU64,
}

/// Counters of a pool, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PoolStats {
    /// Buffers obtained from the allocator.
    pub allocations: u64,
    /// Buffers handed out again after they came back.
    pub reuses: u64,
}

impl<T: Copy + Default + Send + 'static> BufferPool<T> {
    /// A pool that keeps at most `max_free` idle buffers.
    pub fn new(max_free: usize) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                free: Mutex::new(Vec::with_capacity(max_free)),
                max_free,
                allocations: AtomicU64::new(0),
                reuses: AtomicU64::new(0),
            }),
        }
    }

    /// A buffer of exactly `len` elements. Its contents are whatever the previous user left there
    /// (or `T::default()` when freshly allocated): callers overwrite it.
    pub fn get(&self, len: usize) -> PooledBuffer<T> {
        let recycled = self
            .inner
            .free
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop();
        let data = match recycled {
            Some(mut buffer) if buffer.capacity() >= len => {
                self.inner.reuses.fetch_add(1, Ordering::Relaxed);
                // Within capacity: resize never reallocates here.
                buffer.resize(len, T::default());
                buffer
            }
            _ => {
                self.inner.allocations.fetch_add(1, Ordering::Relaxed);
                vec![T::default(); len]
            }
        };
        PooledBuffer {
            data,
            pool: Arc::clone(&self.inner),
        }
    }

    /// Allocation and reuse counters.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            allocations: self.inner.allocations.load(Ordering::Relaxed),
            reuses: self.inner.reuses.load(Ordering::Relaxed),
        }
    }
}

/// A buffer on loan from a [`BufferPool`]; it goes back to the pool when dropped.
pub struct PooledBuffer<T: Copy + Default + Send + 'static> {
    data: Vec<T>,
    pool: Arc<PoolInner<T>>,
}

impl<T: Copy + Default + Send + 'static> Deref for PooledBuffer<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.data
    }
}

impl<T: Copy + Default + Send + 'static> DerefMut for PooledBuffer<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.data
    }
}

impl<T: Copy + Default + Send + 'static> Drop for PooledBuffer<T> {
    fn drop(&mut self) {
        let buffer = std::mem::take(&mut self.data);
        let mut free = self
            .pool
            .free
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if free.len() < self.pool.max_free {
            free.push(buffer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returned_buffers_are_reused_not_reallocated() {
        let pool = BufferPool::<u8>::new(4);
        for _ in 0..100 {
            let mut a = pool.get(1024);
            a[0] = 1;
            let _b = pool.get(1024);
        }
        assert_eq!(pool.stats().allocations, 2);
        assert_eq!(pool.stats().reuses, 198);
    }

    #[test]
    fn a_larger_request_allocates_a_fresh_buffer() {
        let pool = BufferPool::<f32>::new(4);
        drop(pool.get(10));
        let big = pool.get(20);
        assert_eq!(big.len(), 20);
        assert_eq!(pool.stats().allocations, 2);
    }
}
