//! arcfleet
