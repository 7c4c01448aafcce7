//! The model table every backend keys by [`ModelId`], and the per-model
//! ring of staging slots a [`Ticket`] names.
//!
//! Owns: a generational slab (index + generation, so an id kept after
//! `unregister` is refused rather than mistaken for the model registered
//! in its place) and, per model, which of its [`IN_FLIGHT_PER_MODEL`]
//! staging slots hold a batch in flight. Plain Rust, no device: the CPU,
//! the CUDA and the delayed backends share it. Allocates only when a
//! model is registered.

use super::{BackendError, IN_FLIGHT_PER_MODEL};

/// A registered model, as the backend that registered it knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModelId {
    index: u32,
    generation: u32,
}

impl ModelId {
    /// Position in the backend's table (stable while registered).
    pub fn index(self) -> usize {
        self.index as usize
    }
}

/// One batch in flight: the model and the staging slot it occupies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    pub model: ModelId,
    slot: u8,
}

impl Ticket {
    pub fn slot(self) -> usize {
        self.slot as usize
    }
}

struct Entry<T> {
    generation: u32,
    value: Option<T>,
    /// Rows of the batch in each staging slot, `None` when the slot is free.
    busy: [Option<usize>; IN_FLIGHT_PER_MODEL],
}

/// Registered models of type `T` (each backend's per-model state).
pub struct Registry<T> {
    entries: Vec<Entry<T>>,
    free: Vec<u32>,
}

impl<T> Default for Registry<T> {
    fn default() -> Self {
        Registry {
            entries: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> Registry<T> {
    pub fn insert(&mut self, value: T) -> ModelId {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.entries.push(Entry {
                    generation: 0,
                    value: None,
                    busy: [None; IN_FLIGHT_PER_MODEL],
                });
                (self.entries.len() - 1) as u32
            }
        };
        let e = &mut self.entries[index as usize];
        e.value = Some(value);
        e.busy = [None; IN_FLIGHT_PER_MODEL];
        ModelId {
            index,
            generation: e.generation,
        }
    }

    /// Removes and returns the model's state; its id (and every ticket of
    /// it) is refused from now on.
    pub fn remove(&mut self, id: ModelId) -> Option<T> {
        let e = self.entries.get_mut(id.index())?;
        if e.generation != id.generation || e.value.is_none() {
            return None;
        }
        e.generation = e.generation.wrapping_add(1);
        e.busy = [None; IN_FLIGHT_PER_MODEL];
        self.free.push(id.index);
        e.value.take()
    }

    pub fn get(&self, id: ModelId) -> Option<&T> {
        let e = self.entries.get(id.index())?;
        (e.generation == id.generation).then_some(e.value.as_ref()?)
    }

    pub fn get_mut(&mut self, id: ModelId) -> Option<&mut T> {
        let e = self.entries.get_mut(id.index())?;
        (e.generation == id.generation).then_some(e.value.as_mut()?)
    }

    /// Live models, in index order.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (ModelId, &mut T)> {
        self.entries.iter_mut().enumerate().filter_map(|(i, e)| {
            let generation = e.generation;
            e.value.as_mut().map(|v| {
                (
                    ModelId {
                        index: i as u32,
                        generation,
                    },
                    v,
                )
            })
        })
    }

    pub fn len(&self) -> usize {
        self.entries.len() - self.free.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Take a free staging slot of `id` for a batch of `rows` rows.
    pub fn acquire(&mut self, id: ModelId, rows: usize) -> Result<Ticket, BackendError> {
        let e = self
            .entries
            .get_mut(id.index())
            .filter(|e| e.generation == id.generation && e.value.is_some())
            .ok_or(BackendError::Unknown)?;
        let slot = e
            .busy
            .iter()
            .position(Option::is_none)
            .ok_or(BackendError::Busy)?;
        e.busy[slot] = Some(rows);
        Ok(Ticket {
            model: id,
            slot: slot as u8,
        })
    }

    /// The rows of `t`'s batch while it is in flight.
    pub fn rows(&self, t: Ticket) -> Result<usize, BackendError> {
        self.entries
            .get(t.model.index())
            .filter(|e| e.generation == t.model.generation && e.value.is_some())
            .and_then(|e| e.busy.get(t.slot()).copied().flatten())
            .ok_or(BackendError::Unknown)
    }

    /// Free `t`'s staging slot (its batch completed).
    pub fn release(&mut self, t: Ticket) {
        if let Some(e) = self.entries.get_mut(t.model.index()) {
            if e.generation == t.model.generation {
                if let Some(b) = e.busy.get_mut(t.slot()) {
                    *b = None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_a_removed_id_is_refused() {
        let mut r = Registry::default();
        let a = r.insert("a");
        let b = r.insert("b");
        assert_eq!(r.get(a), Some(&"a"));
        assert_eq!(r.remove(a), Some("a"));
        assert_eq!(r.get(a), None);
        assert_eq!(r.remove(a), None);
        // The freed index is reused, under a new generation.
        let c = r.insert("c");
        assert_eq!(c.index(), a.index());
        assert_ne!(c, a);
        assert_eq!(r.get(a), None);
        assert_eq!(r.get(c), Some(&"c"));
        assert_eq!(r.get(b), Some(&"b"));
        assert_eq!(r.len(), 2);
        assert_eq!(r.acquire(a, 1), Err(BackendError::Unknown));
    }

    #[test]
    fn slots_are_bounded_and_released() {
        let mut r = Registry::default();
        let a = r.insert(());
        let t: Vec<Ticket> = (0..IN_FLIGHT_PER_MODEL)
            .map(|i| r.acquire(a, i + 1).unwrap())
            .collect();
        assert_eq!(r.acquire(a, 1), Err(BackendError::Busy));
        assert_eq!(r.rows(t[1]), Ok(2));
        r.release(t[0]);
        assert_eq!(r.rows(t[0]), Err(BackendError::Unknown));
        let again = r.acquire(a, 7).unwrap();
        assert_eq!(again.slot(), t[0].slot());
        assert_eq!(r.rows(again), Ok(7));
        // Unregistering abandons what was in flight.
        r.remove(a);
        assert_eq!(r.rows(t[1]), Err(BackendError::Unknown));
    }
}
