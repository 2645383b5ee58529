//! Memory event callbacks and allocation validators.
//!
//! An event callback learns about every run of pages mapped (`Alloc`, after
//! the map) or about to be unmapped (`Free`, before the unmap), with its
//! address and length. This is how DMA mappings reach users: a VFIO user
//! registers a callback that maps `Alloc` ranges into the IOMMU and unmaps
//! `Free` ranges. A validator is asked before a node's memory grows past
//! its limit and may refuse.
//!
//! Callbacks are process-local (they are code); every process that maps the
//! pages fires its own. They run with the memory hotplug lock held, so they
//! must not allocate or free (pages, heap blocks, memzones): those calls
//! return [`MemsegError::Reentrant`] (or the heap's and the memzones'
//! `Reentrant` errors) instead of deadlocking. The memseg walks and lookups
//! ([`memseg_walk`](crate::Instance::memseg_walk),
//! [`contig_walk`](crate::Instance::contig_walk),
//! [`virt2memseg`](crate::Instance::virt2memseg), ...) are allowed: inside a
//! callback they run without taking the lock, which the thread already
//! holds.

use std::cell::Cell;
use std::sync::Arc;

use serde::Serialize;

use super::MemsegError;
use crate::units::PageSize;

/// Longest callback or validator name, in bytes (DPDK's limit is 63).
pub const CALLBACK_NAME_MAX: usize = 63;

/// Whether pages were mapped or are about to be unmapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MemEventKind {
    /// Pages were just mapped.
    Alloc,
    /// Pages are about to be unmapped.
    Free,
}

/// One memory event: a VA-contiguous run of pages of one list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemEvent {
    /// Alloc or free.
    pub kind: MemEventKind,
    /// First byte.
    pub addr: usize,
    /// Bytes.
    pub len: usize,
    /// Page size.
    pub page_size: PageSize,
    /// NUMA node.
    pub node: u32,
}

/// An event callback.
pub type EventCallback = Arc<dyn Fn(&MemEvent) + Send + Sync>;

/// A validator: `(node, limit, new_total) -> allow`.
pub type Validator = Arc<dyn Fn(u32, u64, u64) -> bool + Send + Sync>;

#[derive(Default)]
pub(crate) struct Registry {
    callbacks: Vec<(String, EventCallback)>,
    validators: Vec<(String, u32, u64, Validator)>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field(
                "callbacks",
                &self.callbacks.iter().map(|c| &c.0).collect::<Vec<_>>(),
            )
            .field(
                "validators",
                &self
                    .validators
                    .iter()
                    .map(|v| (&v.0, v.1, v.2))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn check_name(name: &str) -> Result<(), MemsegError> {
    let why = if name.is_empty() {
        "must not be empty"
    } else if name.len() > CALLBACK_NAME_MAX {
        "is longer than 63 bytes"
    } else {
        return Ok(());
    };
    Err(MemsegError::CallbackName {
        name: name.to_string(),
        why,
    })
}

impl Registry {
    pub(crate) fn add_callback(
        &mut self,
        name: &str,
        cb: EventCallback,
    ) -> Result<(), MemsegError> {
        check_name(name)?;
        if self.callbacks.iter().any(|(n, _)| n == name) {
            return Err(MemsegError::CallbackName {
                name: name.to_string(),
                why: "is already registered",
            });
        }
        self.callbacks.push((name.to_string(), cb));
        Ok(())
    }

    pub(crate) fn remove_callback(&mut self, name: &str) -> Result<(), MemsegError> {
        check_name(name)?;
        let before = self.callbacks.len();
        self.callbacks.retain(|(n, _)| n != name);
        if self.callbacks.len() == before {
            return Err(MemsegError::NoSuchCallback {
                name: name.to_string(),
                node: None,
            });
        }
        Ok(())
    }

    pub(crate) fn add_validator(
        &mut self,
        name: &str,
        node: u32,
        limit: u64,
        v: Validator,
    ) -> Result<(), MemsegError> {
        check_name(name)?;
        if self
            .validators
            .iter()
            .any(|(n, s, ..)| n == name && *s == node)
        {
            return Err(MemsegError::CallbackName {
                name: name.to_string(),
                why: "is already registered for this node",
            });
        }
        self.validators.push((name.to_string(), node, limit, v));
        Ok(())
    }

    pub(crate) fn remove_validator(&mut self, name: &str, node: u32) -> Result<(), MemsegError> {
        check_name(name)?;
        let before = self.validators.len();
        self.validators
            .retain(|(n, s, ..)| !(n == name && *s == node));
        if self.validators.len() == before {
            return Err(MemsegError::NoSuchCallback {
                name: name.to_string(),
                node: Some(node),
            });
        }
        Ok(())
    }

    /// Snapshot of the callbacks, so they can run without the registry lock.
    pub(crate) fn callbacks(&self) -> Vec<EventCallback> {
        self.callbacks.iter().map(|(_, c)| Arc::clone(c)).collect()
    }

    /// Snapshot of the validators of `node`, so they can run without the
    /// registry lock (a validator may register another).
    pub(crate) fn validators_for(&self, node: u32) -> Vec<(String, u64, Validator)> {
        self.validators
            .iter()
            .filter(|(_, s, ..)| *s == node)
            .map(|(n, _, l, v)| (n.clone(), *l, Arc::clone(v)))
            .collect()
    }
}

/// Runs the validators whose limit `new_total` passes; the first refusal
/// names itself.
pub(crate) fn validate(
    instance: usize,
    validators: &[(String, u64, Validator)],
    node: u32,
    asked: u64,
    new_total: u64,
) -> Result<(), MemsegError> {
    for (name, limit, v) in validators.iter().filter(|(_, l, _)| new_total > *l) {
        let allowed = in_callback(instance, || v(node, *limit, new_total));
        if !allowed {
            return Err(MemsegError::LimitExceeded {
                node,
                asked,
                new_total,
                limit: *limit,
                by: format!("validator {name:?}"),
            });
        }
    }
    Ok(())
}

thread_local! {
    /// The instance (its config address) whose callback this thread is
    /// running, 0 when none.
    static IN_CALLBACK: Cell<usize> = const { Cell::new(0) };
}

/// Runs `f` marked as inside a callback of `instance` (its locked calls
/// then refuse, its walks skip the lock this thread already holds).
pub(crate) fn in_callback<R>(instance: usize, f: impl FnOnce() -> R) -> R {
    struct Reset(usize);
    impl Drop for Reset {
        fn drop(&mut self) {
            IN_CALLBACK.with(|c| c.set(self.0));
        }
    }
    let _reset = Reset(IN_CALLBACK.with(|c| c.replace(instance)));
    f()
}

/// Whether this thread runs a callback of `instance`.
pub(crate) fn is_in_callback(instance: usize) -> bool {
    IN_CALLBACK.with(Cell::get) == instance
}

/// Refuses when called from inside a callback of `instance`.
pub(crate) fn not_in_callback(instance: usize, what: &'static str) -> Result<(), MemsegError> {
    if is_in_callback(instance) {
        Err(MemsegError::Reentrant { what })
    } else {
        Ok(())
    }
}

/// Fires `events` through `callbacks` in order.
pub(crate) fn fire(instance: usize, callbacks: &[EventCallback], events: &[MemEvent]) {
    if callbacks.is_empty() {
        return;
    }
    in_callback(instance, || {
        for ev in events {
            for cb in callbacks {
                cb(ev);
            }
        }
    });
}
