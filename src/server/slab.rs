//! A bounded slab: entries are created lazily up to a capacity and reused,
//! so whatever buffers they own keep their capacity between uses.

pub struct Slab<T> {
    items: Vec<T>,
    free: Vec<usize>,
    cap: usize,
}

impl<T: Default> Slab<T> {
    pub fn with_capacity(cap: usize) -> Self {
        Slab {
            items: Vec::new(),
            free: Vec::new(),
            cap,
        }
    }

    /// A free entry's index, or `None` at capacity.
    pub fn acquire(&mut self) -> Option<usize> {
        if let Some(i) = self.free.pop() {
            return Some(i);
        }
        if self.items.len() < self.cap {
            self.items.push(T::default());
            return Some(self.items.len() - 1);
        }
        None
    }

    pub fn release(&mut self, i: usize) {
        debug_assert!(!self.free.contains(&i));
        self.free.push(i);
    }

    /// Entries acquired and not released.
    pub fn in_use(&self) -> usize {
        self.items.len() - self.free.len()
    }

    pub fn get(&self, i: usize) -> Option<&T> {
        self.items.get(i)
    }

    pub fn get_mut(&mut self, i: usize) -> &mut T {
        &mut self.items[i]
    }
}
