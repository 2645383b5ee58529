//! memplane mempool: not built yet (see the issue tracker).
