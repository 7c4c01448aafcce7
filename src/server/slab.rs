//! A bounded slab: entries are created lazily up to a capacity and reused,
//! so whatever buffers they own keep their capacity between uses.

pub struct Slab<T> {
    items: Vec<T>,
    /// Whether each entry is acquired (same index as `items`).
    used: Vec<bool>,
    free: Vec<usize>,
    cap: usize,
}

impl<T: Default> Slab<T> {
    pub fn with_capacity(cap: usize) -> Self {
        Slab {
            items: Vec::new(),
            used: Vec::new(),
            free: Vec::new(),
            cap,
        }
    }

    /// A free entry's index, or `None` at capacity.
    pub fn acquire(&mut self) -> Option<usize> {
        if let Some(i) = self.free.pop() {
            self.used[i] = true;
            return Some(i);
        }
        if self.items.len() < self.cap {
            self.items.push(T::default());
            self.used.push(true);
            return Some(self.items.len() - 1);
        }
        None
    }

    /// Give entry `i` back. Checked in release builds too (one flag, no
    /// scan): an entry released twice would later be handed to two
    /// requests at once, one of which would never be answered; the second
    /// release is logged and ignored instead.
    pub fn release(&mut self, i: usize) {
        match self.used.get_mut(i) {
            Some(u) if *u => {
                *u = false;
                self.free.push(i);
            }
            _ => eprintln!("beast: internal error: slab entry {i} released twice"),
        }
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

#[cfg(test)]
mod tests {
    use super::Slab;

    #[test]
    fn a_double_release_never_hands_one_entry_out_twice() {
        let mut s: Slab<u32> = Slab::with_capacity(4);
        let a = s.acquire().unwrap();
        s.release(a);
        s.release(a);
        assert_eq!(s.in_use(), 0);
        let x = s.acquire().unwrap();
        let y = s.acquire().unwrap();
        assert_ne!(x, y, "one entry handed to two users");
        assert_eq!(s.in_use(), 2);
    }

    #[test]
    fn releasing_an_entry_never_acquired_is_ignored() {
        let mut s: Slab<u32> = Slab::with_capacity(2);
        s.release(7);
        assert_eq!(s.in_use(), 0);
        assert_eq!(s.acquire(), Some(0));
    }
}
