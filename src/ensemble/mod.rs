//! ensemble (server owner)
