//! batch (server owner)
