//! Model check of the `lf_stack` lists (run by `scripts/extra-tests.sh`:
//! `RUSTFLAGS="--cfg loom" cargo test --release -p memplane-mempool --test
//! loom`): every interleaving of a few threads pushing and popping keeps
//! each value exactly once and never hands out a value twice.
#![cfg(loom)]

use loom::thread;
use memplane_mempool::lf_stack::LfStack;

/// Two threads each pop one value and push it back while a third pushes
/// a new one: at the end the stack holds every value once.
#[test]
fn concurrent_pop_push_keeps_every_value_once() {
    loom::model(|| {
        let s = loom::sync::Arc::new(LfStack::new(3).unwrap());
        assert!(s.push(&[1, 2]));
        let ts: Vec<_> = (0..2)
            .map(|_| {
                let s = s.clone();
                thread::spawn(move || {
                    let mut v = [0u64];
                    if s.pop(&mut v) {
                        assert!((1..=3).contains(&v[0]), "popped {}", v[0]);
                        assert!(s.push(&v));
                    }
                })
            })
            .collect();
        assert!(s.push(&[3]));
        for t in ts {
            t.join().unwrap();
        }
        let mut all = [0u64; 3];
        assert!(s.pop(&mut all));
        all.sort_unstable();
        assert_eq!(all, [1, 2, 3]);
        assert!(s.is_empty());
    });
}

/// Two threads pop two values each from a stack of three (one fails and
/// takes nothing), the winner pushes them back: no value lost or doubled
/// (the ABA case: a popped head comes back while another pop is between
/// reading it and swinging it).
#[test]
fn bulk_pops_are_all_or_nothing_under_aba() {
    loom::model(|| {
        let s = loom::sync::Arc::new(LfStack::new(3).unwrap());
        assert!(s.push(&[1, 2, 3]));
        let ts: Vec<_> = (0..2)
            .map(|_| {
                let s = s.clone();
                thread::spawn(move || {
                    let mut v = [0u64; 2];
                    if s.pop(&mut v) {
                        assert_ne!(v[0], v[1]);
                        assert!(s.push(&v));
                        true
                    } else {
                        false
                    }
                })
            })
            .collect();
        let wins = ts.into_iter().map(|t| t.join().unwrap());
        assert!(wins.filter(|&w| w).count() >= 1);
        let mut all = [0u64; 3];
        assert!(s.pop(&mut all));
        all.sort_unstable();
        assert_eq!(all, [1, 2, 3]);
    });
}
