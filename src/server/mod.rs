//! server (server owner)
