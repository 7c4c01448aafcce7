//! metrics (server owner)
