//! The participant runtime (being written).
