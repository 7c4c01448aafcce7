//! config (server owner)
