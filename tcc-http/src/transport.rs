//! The reqwest transport (being written).
