//! memplane mbuf: not built yet (see the issue tracker).
