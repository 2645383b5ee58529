//! memplane ring: not built yet (see the issue tracker).
